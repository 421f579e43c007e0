"""The LLaMA-class model and how to build one from `model.init_from`."""

from __future__ import annotations

from pathlib import Path

import torch

from megakor.model.args import PRESETS, ModelArgs, preset
from megakor.model.llama import Llama
from megakor.model.layers import tp_world


def open_checkpoint(init_from: str):
    """An `HFCheckpoint` for an HF directory, a `.gguf` file or a megakor training checkpoint (its model
    export, merged in memory); None for a size preset."""
    from megakor.checkpoint.hf import HFCheckpoint

    if init_from in PRESETS:
        return None
    p = Path(init_from)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {p} does not exist; fix model.init_from")
        from megakor.checkpoint.gguf import load_gguf_state_dict

        hf_config, state_dict = load_gguf_state_dict(p)
        return HFCheckpoint.from_state_dict(hf_config, state_dict, path=p)
    if p.is_dir() and not (p / "config.json").is_file():
        from megakor.train.checkpointing import is_training_checkpoint, read_export

        if is_training_checkpoint(p):
            from megakor.checkpoint.hf import to_hf_state_dict
            from megakor.model.args import to_hf_config

            merged, args, hf_config, tokenizer = read_export(p)
            return HFCheckpoint.from_state_dict(to_hf_config(args, hf_config), to_hf_state_dict(merged, args),
                                                path=p, tokenizer_path=tokenizer)
    if p.is_dir():
        return HFCheckpoint(p)
    raise FileNotFoundError(
        f"model.init_from={init_from!r} is neither an existing HF checkpoint directory, a .gguf file, "
        f"a megakor checkpoint, nor a preset ({', '.join(PRESETS)})"
    )


def build_model(init_from: str, tp_group=None, attention: str = "auto", loss_chunk_tokens: int = 1024,
                activation_checkpointing: bool = False, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0):
    """(model, checkpoint-or-None): weights read as this TP rank's slices, or random init for a preset."""
    ckpt = open_checkpoint(init_from)
    args = preset(init_from) if ckpt is None else ckpt.args
    model = Llama(args, tp_group, attention, loss_chunk_tokens, activation_checkpointing)
    if ckpt is None:
        model.init_weights(torch.Generator().manual_seed(seed))
    else:
        from megakor.checkpoint.hf import load_into_model

        rank, size = tp_world(tp_group)
        load_into_model(model, ckpt, rank, size)
    return model.to(device=device, dtype=dtype), ckpt


__all__ = ["Llama", "ModelArgs", "PRESETS", "preset", "build_model", "open_checkpoint"]
