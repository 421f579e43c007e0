"""Training checkpoints: DeepSpeed's engine state plus ours, published atomically, and a model-only
export that `launch/convert.py` turns into a Hugging Face directory for any layout.

    checkpoint.dir/
      latest                      the tag to resume from; rewritten (atomically) last
      global_step120/
        zero_pp_rank_*_mp_rank_*  DeepSpeed: ZeRO partitions of parameters and AdamW state, per rank
        megakor_state.json        step, consumed samples/tokens, data-loader state, layout, config
        rng_rank00000.pt          each rank's RNG states
        model/                    the export: tp00-00000.safetensors ... (each TP rank's full slices),
                                  meta.json (architecture, HF config, TP size), tokenizer files

Publishing: every rank writes into `.tmp-global_stepN`; after a barrier rank 0 renames it to
`global_stepN`, then rewrites `latest`, then removes checkpoints beyond `checkpoint.keep`. A crash
at any point leaves `latest` naming a complete checkpoint. The rename assumes `checkpoint.dir` is one
filesystem that all ranks see (as DeepSpeed's own resume does).

The export gathers each parameter with `GatheredParameters` (one at a time, so no rank holds more
than one full parameter beyond its shard) and data-parallel rank 0 of each TP rank writes its slices;
`convert_checkpoint` then merges the TP slices with `hf.merge_tp_shards`. DeepSpeed's zero_to_fp32
was not used: it rebuilds ZeRO partitions of model-parallel rank 0 only and knows nothing of how our
TP slices concatenate (column, row, vocabulary rows with padding).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megakor.config import ConfigError
from megakor.model.args import ModelArgs

STATE_FILE = "megakor_state.json"
EXPORT_DIR = "model"
_TAG = re.compile(r"^global_step(\d+)$")
MAX_EXPORT_SHARD_BYTES = 2 * 1024**3


def tag_for(step: int) -> str:
    return f"global_step{step}"


def latest_tag(root: str | os.PathLike) -> str | None:
    """The tag `latest` names, if it exists and its directory is complete."""
    root = Path(root)
    if not (root / "latest").is_file():
        return None
    tag = (root / "latest").read_text().strip()
    if not (root / tag / STATE_FILE).is_file():
        raise ConfigError(f"{root}/latest names {tag}, which is missing or incomplete; point latest at a complete "
                          f"global_step* directory or remove checkpoint.dir={root} to start over")
    return tag


def read_state(root: str | os.PathLike, tag: str) -> dict:
    return json.loads((Path(root) / tag / STATE_FILE).read_text())


def check_resumable(root: str | os.PathLike, world_size: int, tp: int, pp: int) -> dict | None:
    """The training state `latest` points to, after checking its layout matches this run (before any
    process group: ZeRO partitions can only be reloaded by the same layout)."""
    tag = latest_tag(root)
    if tag is None:
        return None
    state = read_state(root, tag)
    saved = state["layout"]
    if (saved["world_size"], saved["tp"], saved["pp"]) != (world_size, tp, pp):
        raise ConfigError(
            f"checkpoint {Path(root) / tag} was written by {saved['world_size']} processes with "
            f"parallel.tensor={saved['tp']}, parallel.pipeline={saved['pp']}, but this run has {world_size} with "
            f"parallel.tensor={tp}, parallel.pipeline={pp}; resume with the same layout, or convert it "
            "(launch/convert.py) and start a new run from the HF export")
    return state


# ---- RNG -----------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- save / resume -------------------------------------------------------------------------------

def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, ps, root: str | os.PathLike, step: int, state: dict, keep: int,
                    args: ModelArgs, hf_config: dict, tokenizer_dir: str | None) -> Path:
    """Write and publish `global_step{step}` (collective: every rank calls it)."""
    root = Path(root)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-global_step*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={}, save_latest=False)
    tmp = root / tmp_tag
    torch.save(rng_state(), tmp / f"rng_rank{dist.get_rank():05d}.pt")
    export_model(engine.module, tmp / EXPORT_DIR, ps, args, hf_config, tokenizer_dir)
    if dist.get_rank() == 0:
        full_state = {**state, "step": step, "layout": {"world_size": dist.get_world_size(), "tp": ps.tp, "pp": ps.pp,
                                                        "dp": ps.dp}}
        _write_atomic(tmp / STATE_FILE, json.dumps(full_state, indent=1, ensure_ascii=False))
    _barrier()
    if dist.get_rank() == 0:
        final = root / tag
        if final.exists():  # saving the same step twice (e.g. a resumed run that ends where it began)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(root / "latest", tag)
        _prune(root, keep, tag)
    _barrier()
    return root / tag


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    tags = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _TAG.match(p.name)) and p.is_dir())
    for _, path in tags[:-keep]:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(engine, root: str | os.PathLike, tag: str) -> dict:
    """Restore engine (ZeRO partitions, AdamW state) and this rank's RNG; returns our training state."""
    root = Path(root)
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}; the checkpoint is incomplete")
    rng_file = root / tag / f"rng_rank{dist.get_rank():05d}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return read_state(root, tag)


# ---- model export --------------------------------------------------------------------------------

def export_model(model: torch.nn.Module, out: Path, ps, args: ModelArgs, hf_config: dict,
                 tokenizer_dir: str | None, max_shard_bytes: int = MAX_EXPORT_SHARD_BYTES) -> None:
    """Each TP rank's full parameter slices, written by its data-parallel rank 0 (collective)."""
    import deepspeed
    from safetensors.torch import save_file

    writer = ps.dp_rank == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, files = 0, []

    def flush():
        nonlocal shard, size
        name = f"tp{ps.tp_rank:02d}-{len(files):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        shard, size = {}, 0

    for name, p in model.named_parameters():  # same order on every rank: the gathers are collective
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            if writer:
                t = p.detach().to("cpu", copy=True).contiguous()
                if shard and size + t.numel() * t.element_size() > max_shard_bytes:
                    flush()
                shard[name] = t
                size += t.numel() * t.element_size()
    if writer and shard:
        flush()
    if dist.get_rank() == 0:
        meta = {"tp": ps.tp, "args": dataclasses.asdict(args), "hf_config": hf_config}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        if tokenizer_dir is not None:
            from megakor.checkpoint.hf import copy_tokenizer_files

            (out / "tokenizer").mkdir(exist_ok=True)
            copy_tokenizer_files(tokenizer_dir, out / "tokenizer")


def resolve_tag_dir(checkpoint: str | os.PathLike) -> Path:
    """A tag directory from either a checkpoint.dir (its `latest`) or a tag directory itself."""
    p = Path(checkpoint)
    if (p / EXPORT_DIR / "meta.json").is_file():
        return p
    tag = latest_tag(p) if p.is_dir() else None
    if tag is None:
        raise FileNotFoundError(f"{p} is neither a checkpoint.dir with a 'latest' file nor a global_step* directory "
                                "with a model export; pass one of those")
    return p / tag


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge a checkpoint's model export into a Hugging Face directory (tokenizer files included)."""
    from safetensors.torch import load_file

    from megakor.checkpoint.hf import merge_tp_shards, save_hf_checkpoint

    export = resolve_tag_dir(checkpoint) / EXPORT_DIR
    meta = json.loads((export / "meta.json").read_text())
    args = ModelArgs(**meta["args"])
    shards = []
    for r in range(meta["tp"]):
        files = sorted(export.glob(f"tp{r:02d}-*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{export} lacks the slices of tensor-parallel rank {r}; the checkpoint is incomplete")
        shard = {}
        for f in files:
            shard.update(load_file(str(f)))
        shards.append(shard)
    merged = merge_tp_shards(shards, args)
    tokenizer = export / "tokenizer"
    return save_hf_checkpoint(merged, args, out_dir, base_config=meta["hf_config"],
                              tokenizer_dir=tokenizer if tokenizer.is_dir() else None)
