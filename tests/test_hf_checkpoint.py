"""HF checkpoints in and out: round trip, TP slicing, sharded files, and the errors users meet."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megakor.checkpoint.hf import (
    HFCheckpoint,
    load_state_dict,
    merge_tp_shards,
    save_hf_checkpoint,
)
from megakor.checkpoint.source import build_model

from conftest import make_hf_checkpoint


def _all_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("family,dtype", [("llama3", torch.float32), ("qwen2", torch.bfloat16),
                                          ("tied", torch.float32), ("mistral", torch.float32)])
def test_round_trip_bit_identical_and_clean_load(tmp_path, family, dtype):
    src = make_hf_checkpoint(tmp_path / "src", family, dtype=dtype)
    ckpt = HFCheckpoint(src)
    sd = load_state_dict(ckpt)
    out = save_hf_checkpoint(sd, ckpt.args, tmp_path / "out", base_config=ckpt.hf_config, tokenizer_dir=src,
                             max_shard_bytes=40_000)  # force several shards
    assert (out / "model.safetensors.index.json").is_file()
    a, b = _all_tensors(src), _all_tensors(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    logger = logging.getLogger("transformers.modeling_utils")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [r for r in records if "not" in r.getMessage() and "initialized" in r.getMessage()]
    assert model.config.vocab_size == ckpt.args.vocab_size


def test_tp_slices_cover_the_tensor_exactly(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama3")  # vocab 300 → padded to 512 for TP=2
    ckpt = HFCheckpoint(src)
    full = load_state_dict(ckpt)
    shards = [load_state_dict(ckpt, tp_rank=r, tp_size=2) for r in range(2)]
    assert shards[0]["tok_embeddings.weight"].shape == (256, 64)
    assert shards[0]["layers.0.attention.q_proj.weight"].shape == (32, 64)
    assert shards[1]["layers.1.mlp.down_proj.weight"].shape == (64, 80)
    merged = merge_tp_shards(shards, ckpt.args)
    for k, t in full.items():
        assert torch.equal(merged[k], t[: ckpt.args.vocab_size] if "embeddings" in k or "lm_head" in k else t), k
    # A pipeline stage reads only its own layers.
    stage = load_state_dict(ckpt, layers=[1], include_embedding=False, include_head=True)
    assert {k.split(".")[1] for k in stage if k.startswith("layers.")} == {"1"}
    assert "tok_embeddings.weight" not in stage and "lm_head.weight" in stage


def test_old_pytorch_bin_checkpoint_loads(tmp_path, hf_checkpoints):
    src = hf_checkpoints["llama2"]
    old = tmp_path / "old"
    shutil.copytree(src, old)
    sd = _all_tensors(old)
    (old / "model.safetensors").unlink()
    torch.save(sd, old / "pytorch_model.bin")
    a, _ = build_model(str(src))
    b, _ = build_model(str(old))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_unsupported_model_type_is_refused(tmp_path, hf_checkpoints):
    bad = tmp_path / "gpt2"
    shutil.copytree(hf_checkpoints["llama2"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; megakor loads llama, mistral, qwen2"):
        build_model(str(bad))


def test_missing_shard_is_named(tmp_path):
    src = make_hf_checkpoint(tmp_path / "src", "llama2")
    ckpt = HFCheckpoint(src)
    out = save_hf_checkpoint(load_state_dict(ckpt), ckpt.args, tmp_path / "sharded", ckpt.hf_config,
                             max_shard_bytes=40_000)
    (out / "model-00002-of-" f"{len(list(out.glob('model-*.safetensors'))):05d}.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint shard model-00002-of-\d+\.safetensors listed in "
                                                r"model.safetensors.index.json is missing"):
        HFCheckpoint(out)


def test_missing_directory_names_the_fix(tmp_path):
    from megakor.config import ConfigError

    with pytest.raises(ConfigError, match=r"--model='.*/nope' is neither an existing path nor a preset; use an HF "
                                          r"checkpoint directory \(with config.json\), a .gguf file, a megakor "
                                          r"checkpoint.dir, or a preset \(debug, "):
        build_model(str(tmp_path / "nope"))
