"""The LLaMA-class model. Building one from a checkpoint, a GGUF file or a training checkpoint is the
checkpoint layer's job: `megakor.checkpoint.source` (model/ imports neither checkpoint/ nor train/)."""

from __future__ import annotations

from megakor.model.args import PRESETS, ModelArgs, preset
from megakor.model.llama import Llama

__all__ = ["Llama", "ModelArgs", "PRESETS", "preset"]
