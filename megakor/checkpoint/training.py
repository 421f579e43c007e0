"""Reading megakor training checkpoints without any process group: which `global_step*` tags are
complete (every file of the manifest present with its size, optionally its sha256), the training state,
and the model export (`model/`: each TP rank's slices, meta.json, tokenizer files) merged in memory.

Writing, publishing and resuming live in `megakor.train.checkpointing`; this module is what every tool
that only reads a checkpoint (evaluation, generation, conversion, `model.init_from`) needs, below train/.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from megakor.model.args import ModelArgs

STATE_FILE = "megakor_state.json"
MANIFEST = "manifest.json"
EXPORT_DIR = "model"
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def checkpoint_tags(root: str | os.PathLike) -> list[str]:
    """The `global_step*` directories under `root`, newest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [(int(m.group(1)), p.name) for p in root.iterdir() if (m := _TAG.match(p.name)) and p.is_dir()]
    return [name for _, name in sorted(tags, reverse=True)]


def problem(tag_dir: str | os.PathLike, rank: int = 0, world_size: int = 1, hashes: bool = True) -> str | None:
    """Why `tag_dir` is not a complete checkpoint, or None: every file of its manifest present with its
    size, and (with `hashes`) the sha256 of files i ≡ rank (mod world_size), this rank's share."""
    tag_dir = Path(tag_dir)
    try:
        files = json.loads((tag_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (its save was interrupted, or an older megakor wrote it)"
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for i, (name, entry) in enumerate(sorted(files.items())):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {entry['bytes']}"
        if hashes and i % world_size == rank and sha256(path) != entry["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}"
    if STATE_FILE not in files:
        return f"its {MANIFEST} does not list {STATE_FILE}"
    return None


def scan(root: Path) -> tuple[list[str], list[str]]:
    """(tags whose files have the sizes their manifests give, newest first; why each other tag is not)."""
    complete, broken = [], []
    for tag in checkpoint_tags(root):
        reason = problem(root / tag, hashes=False)
        if reason is None:
            try:
                read_state(root, tag)
            except ValueError:
                reason = f"its {STATE_FILE} is unreadable"
        if reason:
            broken.append(f"{tag}: {reason}")
        else:
            complete.append(tag)
    return complete, broken


def latest_tag(root: str | os.PathLike) -> str | None:
    """The newest checkpoint whose files have the sizes its manifest gives (None if there is none)."""
    complete, _ = scan(Path(root))
    return complete[0] if complete else None


def read_state(root: str | os.PathLike, tag: str) -> dict:
    return json.loads((Path(root) / tag / STATE_FILE).read_text())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


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


def read_export(checkpoint: str | os.PathLike) -> tuple[dict, ModelArgs, dict, Path | None]:
    """(full megakor state dict, ModelArgs, source config.json dict, tokenizer dir or None) of a
    checkpoint's model export, TP slices and pipeline stages merged in memory."""
    from safetensors.torch import load_file

    from megakor.checkpoint.hf import merge_tp_shards

    export = resolve_tag_dir(checkpoint) / EXPORT_DIR
    meta = json.loads((export / "meta.json").read_text())
    args = ModelArgs(**meta["args"])
    shards = []
    for r in range(meta["tp"]):
        files = sorted(export.glob(f"tp{r:02d}-*.safetensors"))  # every pipeline stage's, in the pipeline mode
        if not files:
            raise FileNotFoundError(f"{export} lacks the slices of tensor-parallel rank {r}; the checkpoint is incomplete")
        stages = range(meta["pp"]) if meta.get("pp", 1) > 1 else []
        for stage in stages:
            if not any(f.name.startswith(f"tp{r:02d}-pp{stage:02d}-") for f in files):
                raise FileNotFoundError(f"{export} lacks pipeline stage {stage} of tensor-parallel rank {r}; "
                                        "the checkpoint is incomplete")
        shard = {}
        for f in files:
            shard.update(load_file(str(f)))
        shards.append(shard)
    tokenizer = export / "tokenizer"
    return merge_tp_shards(shards, args), args, meta["hf_config"], tokenizer if tokenizer.is_dir() else None


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """A checkpoint.dir (with `latest` or global_step* tags) or one tag directory holding a model export."""
    p = Path(path)
    return p.is_dir() and ((p / EXPORT_DIR).is_dir() or (p / "latest").is_file() or any(p.glob("global_step*")))
