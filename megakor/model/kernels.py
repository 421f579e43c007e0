"""Elementwise kernels of the LLaMA block: RMSNorm, SwiGLU and rotary embeddings.

Each public function is the one the model calls. On CUDA tensors (or anywhere when
`MEGAKOR_KERNELS=triton`, which with `TRITON_INTERPRET=1` runs the Triton kernels on CPU so CI can
check their numerics) it dispatches to the fused Triton kernels in `triton_kernels.py`; otherwise it
runs the plain PyTorch reference below, written to match `transformers` bit for bit in fp32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton is optional: the `gpu` extra installs it; CPU runs never need it.
    from megakor.model import triton_kernels as _tk
except Exception:  # noqa: BLE001 - any import failure (no triton, no driver) means "use PyTorch"
    _tk = None


def _use_triton(x: torch.Tensor) -> bool:
    mode = os.environ.get("MEGAKOR_KERNELS", "auto")
    if mode == "torch" or _tk is None:
        return False
    return mode == "triton" or x.is_cuda


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and cast back before the weight multiply, as transformers' LlamaRMSNorm does.
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, D] in x's dtype (HF's rotate-half layout, no q/k permutation)."""
    return x * cos.unsqueeze(2) + rotate_half(x) * sin.unsqueeze(2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x):
        return _tk.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _use_triton(gate):
        return _tk.swiglu(gate, up)
    return swiglu_reference(gate, up)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return _tk.rope(x, cos, sin)
    return rope_reference(x, cos, sin)
