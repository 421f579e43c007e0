"""Merge a trained checkpoint back toward the checkpoint its training started from.

    merged = start + keep · (trained − start)        for every tensor, 0 < keep <= 1

Weight interpolation between a fine-tuned model and its start (WiSE-FT, Wortsman et al. 2022; model
soups) keeps much of what training taught while giving back much of what it made the model forget, at
no training cost. Both checkpoints must have the same tensors and shapes: the start of an extended
model is its grown (extended, untrained) checkpoint, whose new rows hold their initialisation.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from megakor.checkpoint.hf import HFCheckpoint


def merge_toward_start(start: str | os.PathLike, trained: str | os.PathLike, keep: float,
                       out_dir: str | os.PathLike) -> Path:
    """Write `out_dir`: `trained`'s files with every tensor replaced by start + keep·(trained − start),
    computed in float32 and stored in `trained`'s dtype, in `trained`'s safetensors file layout."""
    from safetensors.torch import save_file

    if not 0.0 < keep <= 1.0:
        raise ValueError(f"merge keep={keep} must be in (0, 1]: 1 keeps the whole training update, "
                         "0.5 half of it")
    a, b = HFCheckpoint(start), HFCheckpoint(trained)
    if sorted(a.keys()) != sorted(b.keys()):
        only = sorted(set(a.keys()) ^ set(b.keys()))[:4]
        raise ValueError(f"{start} and {trained} hold different tensors (e.g. {only}); merge a trained model "
                         "with the checkpoint its training started from")
    for key in b.keys():
        if a.shape(key) != b.shape(key):
            raise ValueError(f"{key} is {a.shape(key)} in {start} but {b.shape(key)} in {trained}; merge a "
                             "trained model with the checkpoint its training started from (same vocabulary)")
    if any(not b.file_of(k).endswith(".safetensors") for k in b.keys()):
        raise ValueError(f"{trained} stores its weights as pytorch_model.bin; write it as safetensors first "
                         "(python launch/convert.py) and merge that")
    out, src = Path(out_dir), Path(trained)
    if out.resolve() in (src.resolve(), Path(start).resolve()):
        raise ValueError(f"out_dir {out} is one of the checkpoints being merged; write the merge elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()
    for f in src.iterdir():  # config, tokenizer, index and extension metadata as trained has them
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)
    by_file: dict[str, list[str]] = {}
    for key in b.keys():
        by_file.setdefault(b.file_of(key), []).append(key)
    for name, keys in by_file.items():
        tensors = {}
        for key in keys:
            t = b.read(key)
            merged = a.read(key).float().lerp_(t.float(), keep)
            tensors[key] = merged.to(t.dtype).contiguous()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
    return out
