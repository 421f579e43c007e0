"""launch/evaluate.py against the protocol computed independently with transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import transformers

from megakor.tokenizer import load_tokenizer

from conftest import REPO

TEXTS = ["대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다." * 3,
         "The quick brown fox jumps over the lazy dog.",
         "혼합 text 문서: mixed Korean and English, 123.",
         "짧다"]


def _write_jsonl(path, corrupt=False):
    with open(path, "wb") as f:
        for i, t in enumerate(TEXTS):
            f.write((json.dumps({"text": t}, ensure_ascii=False) + "\n").encode())
            if corrupt and i == 1:
                f.write(b'{"text": "broken\n')  # malformed JSON
                f.write(b'{"body": "no text field"}\n')
                f.write(b'{"text": "\xff\xfe bad utf8"}\n')
    return path


def reference_loss(model_dir, texts, seq_len, model=None, tok=None):
    """The protocol written out plainly with a transformers model: per document [BOS]+ids, chunks of
    ≤ L, NLL of tokens 2.. of each chunk. Returns (mean NLL, predicted tokens, summed NLL)."""
    if model is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = tok or load_tokenizer(model_dir)
    nll, n = 0.0, 0
    for t in texts:
        s = [tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids
        for i in range(0, len(s), seq_len):
            c = torch.tensor([s[i:i + seq_len]])
            if c.shape[1] < 2:
                continue
            with torch.no_grad():
                logp = torch.log_softmax(model(c).logits[0, :-1].double(), -1)
            nll -= logp.gather(1, c[0, 1:, None]).sum().item()
            n += c.shape[1] - 1
    return nll / n, n, nll


@pytest.mark.parametrize("family", ["llama3", "llama2", "mistral", "qwen2", "tied"])
def test_evaluate_cli_loss_equals_transformers(tmp_path, hf_checkpoints, family):
    data = _write_jsonl(tmp_path / "d.jsonl", corrupt=True)
    out = tmp_path / "r.json"
    seq_len = 16  # several chunks per document, several chunks per packed row
    r = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), "--model", str(hf_checkpoints[family]),
                        "--data", str(data), "--seq-len", str(seq_len), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    loss, tokens, nll = reference_loss(hf_checkpoints[family], TEXTS, seq_len)
    assert res["tokens"] == tokens
    assert abs(res["loss"] - loss) / loss < 1e-5
    chars = sum(map(len, TEXTS))
    assert res["chars"] == chars and res["documents"] == len(TEXTS)
    assert abs(res["bits_per_char"] - nll / math.log(2) / chars) / res["bits_per_char"] < 1e-5
    assert abs(res["bits_per_byte"] - nll / math.log(2) / sum(len(t.encode()) for t in TEXTS)) < 1e-5
    assert res["skipped"] == 3
    assert res["skipped_reasons"] == {"malformed_json": 1, "missing_text_field": 1, "invalid_utf8": 1}


def test_named_splits_and_missing_file(tmp_path, hf_checkpoints):
    a = _write_jsonl(tmp_path / "a.jsonl")
    r = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), "--model", str(hf_checkpoints["llama2"]),
                        "--data", f"ko={a},en={a}", "--seq-len", "32", "--json", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o.json").read_text())
    assert set(res) == {"ko", "en"} and res["ko"]["loss"] == res["en"]["loss"]
    r = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), "--model", str(hf_checkpoints["llama2"]),
                        "--data", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: evaluation data") and "missing.jsonl" in r.stderr
