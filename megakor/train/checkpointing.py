"""Training checkpoints: DeepSpeed's engine state plus ours, published atomically, and a model-only
export that `launch/convert.py` turns into a Hugging Face directory for any layout.

    checkpoint.dir/
      latest                      the newest published tag, for tools; rewritten (atomically) after publishing
      global_step120/
        zero_pp_rank_*_mp_rank_*  DeepSpeed: ZeRO partitions of parameters and AdamW state, per rank
        megakor_state.json        step, consumed samples/tokens, data-loader state, layout, config
        rng_rank00000.pt          each rank's RNG states
        model/                    the export: tp00-00000.safetensors ... (each TP rank's full slices;
                                  tp00-pp01-00000... per pipeline stage), meta.json (architecture, HF
                                  config, TP and PP sizes), tokenizer files
        manifest.json             every other file's size and sha256; written last, before publishing

Publishing: every rank writes into `.tmp-global_stepN`; after a barrier the ranks hash the files (each
a share) and rank 0 writes the manifest, renames the directory to `global_stepN`, rewrites `latest`,
then removes checkpoints beyond `checkpoint.keep` (each renamed to `.tmp-*` before it is deleted). Every
`.tmp-*` is debris of an interrupted save and is removed when the next save starts.

Resuming takes the newest `global_step*` whose files match its manifest, whatever `latest` says: a
crash after the rename but before `latest` loses nothing, and a checkpoint that is truncated or
corrupt (a node that died with data in its page cache, a filesystem fault) is skipped, with a warning,
for the one before it. Sizes are checked before any process group exists; hashes after, each rank
hashing a share, so all ranks agree on the tag. To roll back, move the newer directories away.
The renames assume `checkpoint.dir` is one filesystem that all ranks see (as DeepSpeed's own resume does).

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
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megakor.config import ConfigError
from megakor.model.args import ModelArgs
from megakor.checkpoint.training import (  # noqa: F401  (the reading side, shared with every tool)
    EXPORT_DIR, MANIFEST, STATE_FILE, checkpoint_tags, is_training_checkpoint, latest_tag, problem, read_export,
    read_state, resolve_tag_dir, tag_for)
from megakor.checkpoint.training import scan as _scan
from megakor.checkpoint.training import sha256 as _sha256
from megakor.train import faults

MAX_EXPORT_SHARD_BYTES = 2 * 1024**3


def _check_layout(root: Path, tag: str, state: dict, world_size: int, tp: int, pp: int) -> None:
    saved = state["layout"]
    if (saved["world_size"], saved["tp"], saved["pp"]) != (world_size, tp, pp):
        raise ConfigError(
            f"checkpoint {root / tag} was written by {saved['world_size']} processes with "
            f"parallel.tensor={saved['tp']}, parallel.pipeline={saved['pp']}, but this run has {world_size} with "
            f"parallel.tensor={tp}, parallel.pipeline={pp}; resume with the same layout, or convert it "
            "(launch/convert.py) and start a new run from the HF export")


def _none_complete(root: Path, broken: list[str]) -> ConfigError:
    return ConfigError(f"checkpoint.dir={root} holds no complete checkpoint ({'; '.join(broken)}); move the broken "
                       "global_step* directories away to start over, or set another checkpoint.dir")


def check_resumable(root: str | os.PathLike, world_size: int, tp: int, pp: int) -> dict | None:
    """The training state of the checkpoint a run would resume from (sizes checked, not hashes), after
    checking its layout matches this run (before any process group: ZeRO partitions can only be
    reloaded by the same layout)."""
    root = Path(root)
    complete, broken = _scan(root)
    if not complete:
        if broken:
            raise _none_complete(root, broken)
        return None
    state = read_state(root, complete[0])
    _check_layout(root, complete[0], state, world_size, tp, pp)
    return state


def resume_point(root: str | os.PathLike, world_size: int, tp: int, pp: int) -> tuple[str | None, list[str]]:
    """(the tag to resume from, why each newer checkpoint was skipped); collective: rank 0's listing is
    shared, every rank hashes its share of each candidate's files, and all agree on the verdict."""
    root = Path(root)
    rank, world = _rank_world()
    listing = [_scan(root) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(listing, src=0)
    complete, skipped = listing[0]
    for tag in complete:
        reasons = [problem(root / tag, rank, world)]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, reasons[0])
            reasons = gathered
        reason = next((r for r in reasons if r), None)
        if reason is None:
            _check_layout(root, tag, read_state(root, tag), world_size, tp, pp)
            return tag, skipped
        skipped.append(f"{tag}: {reason}")
    if skipped:
        raise _none_complete(root, skipped)
    return None, []


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


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def save_checkpoint(engine, ps, root: str | os.PathLike, step: int, state: dict, keep: int,
                    args: ModelArgs, hf_config: dict, tokenizer_dir: str | None) -> Path:
    """Write and publish `global_step{step}` (collective: every rank calls it)."""
    root = Path(root)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save or prune
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={}, save_latest=False)
    tmp = root / tmp_tag
    torch.save(rng_state(), tmp / f"rng_rank{dist.get_rank():05d}.pt")
    faults.kill_during_save(step)
    export_model(engine.module, tmp / EXPORT_DIR, ps, args, hf_config, tokenizer_dir)
    if dist.get_rank() == 0:
        full_state = {**state, "step": step, "layout": {"world_size": dist.get_world_size(), "tp": ps.tp, "pp": ps.pp,
                                                        "dp": ps.dp}}
        _write_atomic(tmp / STATE_FILE, json.dumps(full_state, indent=1, ensure_ascii=False))
    _barrier()
    write_manifest(tmp)
    if dist.get_rank() == 0:
        _publish(root, tmp, tag)
        _write_atomic(root / "latest", tag)
        _prune(root, keep, tag)
    _barrier()
    return root / tag


def write_manifest(tag_dir: Path) -> None:
    """Record every file's size and sha256 in `tag_dir/manifest.json` (collective when a process group
    exists: rank 0's listing is shared, each rank hashes a share, rank 0 writes)."""
    rank, world = _rank_world()
    names = [sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
             if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(names, src=0)
    mine = {n: {"bytes": (tag_dir / n).stat().st_size, "sha256": _sha256(tag_dir / n)}
            for i, n in enumerate(names[0]) if i % world == rank}
    shares = [mine]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    if rank == 0:
        files = {k: v for share in shares for k, v in share.items()}
        _write_atomic(tag_dir / MANIFEST, json.dumps({"files": dict(sorted(files.items()))}, indent=1))


def _publish(root: Path, tmp: Path, tag: str) -> None:
    final = root / tag
    aside = root / f".tmp-replaced-{tag}"
    if final.exists():  # the same step saved again (e.g. after resuming past a corrupt newer checkpoint)
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (not possible on every filesystem; then the rename is as durable as it gets)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep: int, current: str) -> None:
    if keep <= 0:
        return
    for tag in checkpoint_tags(root)[keep:]:
        if tag != current:
            doomed = root / f".tmp-pruned-{tag}"  # a crash mid-delete leaves debris, not a broken global_step*
            os.rename(root / tag, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


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
    """Each TP rank's full parameter slices, written by its data-parallel rank 0 (collective). In the
    pipeline mode each stage writes its own parameters, under their megakor names (`tpXX-ppYY-*`); the
    last stage's copy of a tied embedding is left to the first stage."""
    import deepspeed
    from safetensors.torch import save_file

    writer = ps.dp_rank == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, files = 0, []

    def flush():
        nonlocal shard, size
        stage = f"pp{ps.pp_rank:02d}-" if ps.pp > 1 else ""
        name = f"tp{ps.tp_rank:02d}-{stage}{len(files):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        shard, size = {}, 0

    named = model.megakor_parameters().items() if ps.pp > 1 else model.named_parameters()
    for name, p in named:  # same order on every rank: the gathers are collective
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
        meta = {"tp": ps.tp, "pp": ps.pp, "args": dataclasses.asdict(args), "hf_config": hf_config}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        if tokenizer_dir is not None:
            from megakor.checkpoint.hf import copy_tokenizer_files

            (out / "tokenizer").mkdir(exist_ok=True)
            copy_tokenizer_files(tokenizer_dir, out / "tokenizer")


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Merge a checkpoint's model export into a Hugging Face directory (tokenizer files included)."""
    from megakor.checkpoint.hf import save_hf_checkpoint

    merged, args, hf_config, tokenizer = read_export(checkpoint)
    return save_hf_checkpoint(merged, args, out_dir, base_config=hf_config, tokenizer_dir=tokenizer)
