"""Merging a trained checkpoint back toward its start (WiSE-FT) against tensors computed here."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_hf_checkpoint
from megakor.checkpoint.merge import merge_toward_start


def _trained_copy(start, path, seed=1):
    """A copy of `start` with every tensor moved by a random update (as if trained)."""
    shutil.copytree(start, path)
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.05 for k, v in tensors.items()},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_merge_is_start_plus_keep_times_update_and_transformers_loads_it(tmp_path):
    import transformers

    start = make_hf_checkpoint(tmp_path / "start", "llama3")
    trained = _trained_copy(start, tmp_path / "trained")
    a, b = load_file(str(start / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    for keep in (0.3, 1.0):
        out = merge_toward_start(start, trained, keep, tmp_path / f"merged-{keep}")
        m = load_file(str(out / "model.safetensors"))
        assert sorted(m) == sorted(b)
        for k in b:
            expect = (a[k].double() + keep * (b[k].double() - a[k].double())).float()
            torch.testing.assert_close(m[k], expect, rtol=0, atol=1e-6)
            assert m[k].dtype == b[k].dtype
        if keep == 1.0:
            assert all(torch.equal(m[k], b[k]) for k in b)
    assert json.loads((out / "config.json").read_text()) == json.loads((trained / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged-0.3"))
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.isfinite(model(ids).logits).all()


def test_merge_refuses_what_it_cannot_merge(tmp_path):
    start = make_hf_checkpoint(tmp_path / "start", "llama3")
    other = make_hf_checkpoint(tmp_path / "other", "llama3", vocab_size=320)
    trained = _trained_copy(start, tmp_path / "trained")
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        merge_toward_start(start, trained, 0.0, tmp_path / "m")
    with pytest.raises(ValueError, match="same vocabulary"):
        merge_toward_start(other, trained, 0.5, tmp_path / "m")
    with pytest.raises(ValueError, match="is one of the checkpoints being merged"):
        merge_toward_start(start, trained, 0.5, trained)
    with pytest.raises(ValueError, match="is one of the checkpoints being merged"):
        merge_toward_start(start, trained, 0.5, start)
    assert not (tmp_path / "m").exists(), "a refused merge writes nothing"
