"""launch/convert.py's offline modes: vocabulary growth of an HF checkpoint, and its errors."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO, make_hf_checkpoint

KOREAN = ["대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다."] * 20


def test_grow_vocabulary_keeps_old_rows_and_inits_new_rows_by_subword_mean(tmp_path):
    from megakor.tokenizer import load_tokenizer
    from megakor.tokenizer.embeddings import new_token_decompositions
    from megakor.tokenizer.extend import extend_tokenizer

    hf = make_hf_checkpoint(tmp_path / "hf", "llama3")
    ext = tmp_path / "ext"
    extend_tokenizer(hf, KOREAN, 10, ext, min_frequency=1)
    r = subprocess.run([sys.executable, "launch/convert.py", "--model", str(hf), "--tokenizer", str(ext),
                        "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, after = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "out/model.safetensors"))
    base_tok, new_tok = load_tokenizer(hf), load_tokenizer(ext)
    n_base, n_new = len(base_tok), len(new_tok)
    assert after["model.embed_tokens.weight"].shape[0] == max(n_new, 300)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(after[k][:n_base], before[k][:n_base])
        for new_id, pieces in new_token_decompositions(base_tok, new_tok).items():
            expected = before[k][pieces].double().mean(0).float()
            assert torch.equal(after[k][new_id], expected), (k, new_id)
    assert load_tokenizer(tmp_path / "out")("대한민국").input_ids == new_tok("대한민국").input_ids


def test_errors_are_one_sentence(tmp_path):
    r = subprocess.run([sys.executable, "launch/convert.py", "--gguf", str(tmp_path / "none.gguf"), "--out",
                        str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([sys.executable, "launch/convert.py", "--model", str(tmp_path), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--model needs --tokenizer" in r.stderr
