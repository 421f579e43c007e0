"""Staged training after vocabulary extension: stage 1 (train.freeze=new_embeddings_only) under ZeRO-3
DP=2 and TP=2 moves only the new tokens' embedding/head rows; every old row and every other tensor
stays bit-identical. The rows are grown at start-up from tokenizer.path (subword-mean init)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_hf_checkpoint
from dist_utils import check, launch, write_corpus

CONFIG = "configs/runs/tiny_cpu.yaml"
KOREAN = ["대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다."] * 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megakor.tokenizer import load_tokenizer
    from megakor.tokenizer.extend import extend_tokenizer

    root = tmp_path_factory.mktemp("freeze")
    out = {}
    for family in ("llama3", "tied"):
        hf = make_hf_checkpoint(root / family, family)
        ext = root / f"{family}-ext"
        extend_tokenizer(hf, KOREAN, 12, ext, min_frequency=1)
        base_n, new_n = len(load_tokenizer(hf)), len(load_tokenizer(ext))
        assert new_n > 300 > base_n - 1  # the new ids reach past the checkpoint's 300 rows
        corpus = write_corpus(root / f"{family}-train", n_docs=100, vocab=new_n, seed=0, eos=1)
        out[family] = dict(hf=hf, ext=ext, base_n=base_n, new_n=new_n, corpus=corpus)
    return root, out


def _train_and_export(root, info, layout: str, nprocs: int, extra: list[str]):
    from megakor.train.checkpointing import convert_checkpoint

    d = root / layout
    overrides = [f"model.init_from={info['hf']}", f"tokenizer.path={info['ext']}",
                 "train.freeze=new_embeddings_only", f"data.sources=[{{path: {info['corpus']}}}]",
                 "train.steps=3", "optim.lr=1e-2", "optim.weight_decay=0.1", "optim.warmup_steps=0",
                 "train.eval_batches=0", "checkpoint.every=0", f"checkpoint.dir={d / 'ck'}",
                 f"logging.tensorboard_dir={d / 'tb'}", f"data.cache_dir={d / 'cache'}", *extra]
    check(launch(nprocs, ["tests/dist_utils.py", CONFIG, json.dumps([overrides])], timeout=300))
    return load_file(str(convert_checkpoint(d / "ck", d / "hf") / "model.safetensors"))


@pytest.mark.parametrize("family,layout,nprocs,extra", [
    ("tied", "dp2", 2, []),
    ("llama3", "tp2", 2, ["parallel.tensor=2"]),
])
def test_stage1_moves_only_new_rows(setup, family, layout, nprocs, extra):
    root, infos = setup
    info = infos[family]
    original = load_file(str(info["hf"] / "model.safetensors"))
    trained = _train_and_export(root / family, info, layout, nprocs, extra)
    base_n = info["base_n"]
    heads = ["model.embed_tokens.weight"] + ([] if family == "tied" else ["lm_head.weight"])
    for k, t in original.items():
        if k in heads:
            assert trained[k].shape[0] == info["new_n"]
            assert torch.equal(trained[k][:base_n], t[:base_n]), f"{k}: an old row moved"
        else:
            assert torch.equal(trained[k], t), f"{k} moved although frozen"
    # The new rows did train (the test can fail): they differ from their subword-mean initialisation.
    from megakor.checkpoint.hf import HFCheckpoint
    from megakor.checkpoint.resize import ResizedCheckpoint

    init = ResizedCheckpoint(HFCheckpoint(info["hf"]), info["hf"], info["ext"])
    for k in heads:
        start = init.read(k)[base_n:]
        assert (trained[k][base_n:] - start).abs().max() > 1e-4, f"{k}: new rows did not train"


def test_frozen_layers_keep_their_weights_and_the_rest_trains(setup):
    """train.frozen_layers under ZeRO-3 DP=2 (the default job's layout): layer 0's tensors come back
    bit-identical through weight decay and three updates; layer 1, the norms and the embedding move."""
    root, infos = setup
    info = infos["llama3"]
    d = root / "frozen-layers"
    corpus = write_corpus(d / "train", n_docs=100, vocab=300, seed=0, eos=1)
    overrides = [f"model.init_from={info['hf']}", f"data.sources=[{{path: {corpus}}}]",
                 "train.frozen_layers=0-0", "train.steps=3", "optim.lr=1e-2", "optim.weight_decay=0.1",
                 "optim.warmup_steps=0", "train.eval_batches=0", "checkpoint.every=0", f"checkpoint.dir={d / 'ck'}",
                 f"logging.tensorboard_dir={d / 'tb'}", f"data.cache_dir={d / 'cache'}"]
    check(launch(2, ["tests/dist_utils.py", CONFIG, json.dumps([overrides])], timeout=300))
    from megakor.train.checkpointing import convert_checkpoint

    trained = load_file(str(convert_checkpoint(d / "ck", d / "hf") / "model.safetensors"))
    original = load_file(str(info["hf"] / "model.safetensors"))
    assert any(k.startswith("model.layers.1.") for k in original)
    for k, t in original.items():
        if k.startswith("model.layers.0."):
            assert torch.equal(trained[k], t), f"{k} moved although its layer is frozen"
        elif k.endswith("proj.weight") or k == "model.embed_tokens.weight":
            assert not torch.equal(trained[k], t), f"{k} did not train"


def test_frozen_layers_are_checked_before_training():
    from megakor.config import ConfigError, layer_range

    assert layer_range("8-21") == range(8, 22) and layer_range("3") == range(3, 4) and not layer_range("")
    with pytest.raises(ConfigError, match="not a layer range"):
        layer_range("eight")
    with pytest.raises(ConfigError, match="not a layer range"):
        layer_range("3-")
    with pytest.raises(ConfigError, match="names no layers"):
        layer_range("5-2")
    with pytest.raises(ConfigError, match="past the model's 30 layers"):
        layer_range("20-30", 30)
