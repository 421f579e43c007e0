"""One resolver decides what a model source is (megakor.checkpoint.source), for training, evaluation,
generation, conversion and the planner: a preset, an HF directory and a megakor training checkpoint
(checkpoint.dir or one global_step*) each resolve to the same architecture and weights everywhere."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_checkpoint
from dist_utils import REPO, write_corpus
from megakor.checkpoint.source import build_model, resolve_model_source
from megakor.config import ConfigError, load_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny HF checkpoint and a training checkpoint.dir whose export holds the same weights."""
    from safetensors.torch import save_file

    from megakor.checkpoint.hf import HFCheckpoint, copy_tokenizer_files, load_state_dict
    from megakor.checkpoint.training import STATE_FILE
    from megakor.train.checkpointing import write_manifest

    root = tmp_path_factory.mktemp("sources")
    hf = make_hf_checkpoint(root / "hf", "qwen2")
    ckpt = HFCheckpoint(hf)
    tag = root / "ck" / "global_step5"
    (tag / "model" / "tokenizer").mkdir(parents=True)
    save_file(load_state_dict(ckpt), str(tag / "model" / "tp00-00000.safetensors"))
    (tag / "model" / "meta.json").write_text(json.dumps({"tp": 1, "pp": 1, "args": dataclasses.asdict(ckpt.args),
                                                         "hf_config": ckpt.hf_config}))
    copy_tokenizer_files(hf, tag / "model" / "tokenizer")
    (tag / STATE_FILE).write_text(json.dumps({"step": 5, "layout": {"world_size": 1, "tp": 1, "pp": 1, "dp": 1}}))
    write_manifest(tag)
    (root / "ck" / "latest").write_text("global_step5")
    return {"root": root, "hf": hf, "ck": root / "ck", "tag": tag}


def test_each_kind_is_recognised_and_describes_the_same_model(sources):
    hf, ck, tag = sources["hf"], sources["ck"], sources["tag"]
    assert resolve_model_source("debug").kind == "preset"
    a, b, c = resolve_model_source(str(hf)), resolve_model_source(str(ck)), resolve_model_source(str(tag))
    assert (a.kind, b.kind, c.kind) == ("hf", "training", "training") and b.path == c.path == tag
    assert a.args() == b.args()
    assert b.tokenizer_dir() == tag / "model" / "tokenizer" and a.tokenizer_dir() == hf
    for s in (a, b):
        s.check_files()
    ref, got = a.open(), b.open()
    for key in ref.keys():
        assert torch.equal(ref.read(key), got.read(key)), key
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        logits = [build_model(str(p))[0](ids) for p in (hf, ck)]
    assert torch.equal(logits[0], logits[1])


def test_training_preflight_and_planner_accept_a_training_checkpoint(sources, tmp_path):
    """The engine used to refuse a megakor checkpoint that the model loader accepted."""
    from megakor.plan import resolve_model_args
    from megakor.train.preflight import preflight

    prefix = write_corpus(tmp_path / "train", 20, vocab=300, seed=0)
    cfg = load_config(REPO / "configs/runs/tiny_cpu.yaml", [
        f"model.init_from={sources['ck']}", f"data.sources=[{{path: {prefix}}}]", f"checkpoint.dir={tmp_path / 'c'}",
        f"logging.tensorboard_dir={tmp_path / 'tb'}"])
    assert preflight(cfg, 1) == resolve_model_source(str(sources["hf"])).args()
    assert resolve_model_args(cfg)[0].vocab_size == 300


def test_the_wrong_kind_for_a_tool_is_one_sentence(sources, tmp_path):
    with pytest.raises(ConfigError, match="holds neither config.json nor a megakor checkpoint"):
        resolve_model_source(str(tmp_path))
    r = subprocess.run([sys.executable, "launch/convert.py", "--checkpoint", str(sources["hf"]), "--out",
                        str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr == (f"error: --checkpoint={sources['hf']} is an HF directory, not a training "
                                              "checkpoint; pass it with --model\n"), r.stderr
