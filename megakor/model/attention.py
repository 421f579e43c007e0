"""Rotary position embeddings (plain, linear, dynamic-NTK, llama3) and the attention backends.

Packed sequences: `position_ids` restart at 0 at every document start. The data layer derives from
them, on the host and once per micro-batch, `cu_seqlens` (cumulative document lengths over the
flattened batch) and the longest document, and passes both down. On CUDA every layer then makes one
varlen attention call over all documents of the micro-batch (flash-attn's kernel when installed, else
PyTorch's own `varlen_attn`): no per-document loop, no mask, no device→host sync, and no new kernel
plan per document length. On CPU, causal SDPA per document is the correct path tests run. Callers
that pass no `cu_seqlens` (generation, evaluation, parity tests) get them derived here, at the cost of
a sync.
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megakor.model.args import ModelArgs

log = logging.getLogger(__name__)

try:  # the `gpu` extra; only used on CUDA tensors
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - a missing or broken build both mean "not available"
    flash_attn_varlen_func = None

try:  # PyTorch's own varlen attention (2.10+; its signature changed between releases, read at run time)
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except Exception:  # noqa: BLE001
    torch_varlen_attn = None


# ---- RoPE -----------------------------------------------------------------------------------------

def rope_inv_freq(args: ModelArgs, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32, as transformers computes them for each rope_type."""
    dim = args.head_dim
    base = args.rope_theta
    s = args.rope_scaling or {}
    kind = args.rope_type
    if kind == "dynamic":
        # NTK-aware: the base grows once the sequence exceeds the trained context.
        n = max(seq_len or 0, args.max_position_embeddings)
        factor = s["factor"]
        base = base * ((factor * n / args.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) * ~(wavelen > old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                max_seqlen: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [B, T, head_dim] in `dtype`, computed in fp32. `max_seqlen` (the longest document,
        known on the host) spares dynamic NTK scaling a sync."""
        inv_freq = self.inv_freq
        if self.args.rope_type == "dynamic":
            longest = max_seqlen if max_seqlen is not None else int(position_ids.max()) + 1
            if longest > self.args.max_position_embeddings:
                inv_freq = rope_inv_freq(self.args, longest).to(position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids.float().unsqueeze(-1) * inv_freq.float()
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)


# ---- attention ------------------------------------------------------------------------------------

def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative document lengths over the flattened batch (int32, as varlen kernels want) and the
    longest document. Every row start is a boundary even if its position is not 0."""
    starts = position_ids == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
    total = position_ids.numel()
    cu = torch.cat([idx, idx.new_tensor([total])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return cu, max_len


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    starts = position_ids == 0
    starts[:, 0] = True
    return starts.long().cumsum(dim=1)


def packed_causal_mask(position_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask, True where attention is allowed: causal and inside one document."""
    T = position_ids.shape[1]
    doc = document_ids(position_ids)
    i = torch.arange(T, device=position_ids.device)
    allowed = (i[None, :, None] >= i[None, None, :]) & (doc[:, :, None] == doc[:, None, :])
    if sliding_window is not None:
        allowed &= (i[None, :, None] - i[None, None, :]) < sliding_window
    return allowed.unsqueeze(1)


def is_packed(position_ids: torch.Tensor) -> bool:
    """True when some row holds more than one document (a position 0 after the row start)."""
    return bool((position_ids[:, 1:] == 0).any())


_logged_backend: set[str] = set()
BACKENDS = ("auto", "flash", "varlen", "sdpa")


def choose_backend(requested: str, q: torch.Tensor, sliding_window: int | None = None) -> str:
    """flash (flash-attn's varlen kernel), varlen (torch.nn.attention.varlen) or sdpa. `auto` takes the
    first varlen kernel available on CUDA tensors that can do the model's sliding window, SDPA elsewhere."""
    if requested == "auto":
        if q.is_cuda and flash_attn_varlen_func is not None:
            backend = "flash"
        elif q.is_cuda and torch_varlen_attn is not None and (
                sliding_window is None or "window_size" in varlen_parameters(torch_varlen_attn)):
            backend = "varlen"
        else:
            backend = "sdpa"
    elif requested == "flash" and (flash_attn_varlen_func is None or not q.is_cuda):
        raise RuntimeError(
            "model.attention=flash needs the flash-attn package and CUDA tensors; install the `gpu` extra "
            "or set model.attention=auto"
        )
    elif requested == "varlen" and torch_varlen_attn is None:
        raise RuntimeError("model.attention=varlen needs torch.nn.attention.varlen (PyTorch 2.10 or later); "
                           "upgrade torch or set model.attention=auto")
    elif requested in ("flash", "varlen", "sdpa"):
        backend = requested
    else:
        raise ValueError(f"model.attention={requested!r} is not a backend; use {', '.join(BACKENDS)}")
    if backend not in _logged_backend:
        _logged_backend.add(backend)
        log.info("attention backend: %s", backend)
    return backend


_varlen_parameters: dict = {}  # varlen_attn function → its parameter names


def varlen_parameters(fn) -> frozenset:
    if fn not in _varlen_parameters:
        _varlen_parameters[fn] = frozenset(inspect.signature(fn).parameters)
    return _varlen_parameters[fn]


def _torch_varlen(q, k, v, cu, max_len: int, sliding_window: int | None):
    """One call of PyTorch's varlen_attn over packed [N, heads, D] tensors, causal, shaped for the
    signature this torch has: 2.11 takes `window_size` ((-1, 0) is causal) and fewer KV heads natively,
    2.12+ also wants `enable_gqa=True` for them; 2.10 took `is_causal` and equal head counts."""
    fn = torch_varlen_attn
    params = varlen_parameters(fn)
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    else:
        if sliding_window is not None:
            raise RuntimeError("this PyTorch's varlen_attn has no sliding window; install flash-attn or a newer "
                               "torch, or set model.attention=sdpa")
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif "window_size" not in params:  # the is_causal generation wants one KV head per query head
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def attention(q, k, v, position_ids, sliding_window=None, backend: str = "auto", cu_seqlens=None,
              max_seqlen: int | None = None):
    """Causal grouped-query attention over packed documents.

    q: [B, T, H, D]; k, v: [B, T, Hkv, D]; position_ids: [B, T]; cu_seqlens: int32 [documents + 1]
    over the flattened batch and max_seqlen its longest document (host int), from the data layer.
    Returns [B, T, H, D].
    """
    B, T, H, D = q.shape
    kind = choose_backend(backend, q, sliding_window)
    if kind in ("flash", "varlen"):
        if cu_seqlens is None:
            cu_seqlens, max_seqlen = cu_seqlens_from_positions(position_ids)
        qf, kf, vf = q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D)
        if kind == "flash":
            window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
            out = flash_attn_varlen_func(qf, kf, vf, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                         window_size=window)
        else:
            out = _torch_varlen(qf, kf, vf, cu_seqlens, max_seqlen, sliding_window)
        return out.view(B, T, H, D)
    gqa = H != k.shape[2]
    if sliding_window is not None and T > sliding_window:
        mask = packed_causal_mask(position_ids, sliding_window)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa).transpose(1, 2)
    # One document per row needs no boundaries (known on the host from cu_seqlens' length).
    packed = cu_seqlens.numel() - 1 > B if cu_seqlens is not None else is_packed(position_ids)
    if not packed:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    # Packed rows without a varlen kernel (CPU): causal attention per document. Costs Σ Lᵢ² instead of
    # the T² of a block-diagonal mask, and keeps SDPA on its fast is_causal path (2× faster on CPU).
    cu = cu_seqlens if cu_seqlens is not None else cu_seqlens_from_positions(position_ids)[0]
    bounds = cu.tolist()  # host memory on CPU; on CUDA this fallback syncs once per layer
    qf, kf, vf = q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D)
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            seg = [t[s:e].transpose(0, 1).unsqueeze(0) for t in (qf, kf, vf)]  # [1, heads, L, D]
            outs.append(F.scaled_dot_product_attention(*seg, is_causal=True, enable_gqa=gqa)[0].transpose(0, 1))
    return torch.cat(outs).view(B, T, H, D)


def cached_attention(q, k, v, past: int, sliding_window: int | None = None):
    """Causal grouped-query attention of new queries over cached plus new keys (generation).

    q: [B, T, H, D], the tokens at positions past..past+T-1; k, v: [B, past+T, Hkv, D], every key so
    far. All rows share one length (no padding), so one [T, past+T] mask serves the batch. SDPA's
    `is_causal` aligns the triangle top-left, which is wrong once past > 0, hence the explicit mask.
    """
    T, S = q.shape[1], k.shape[1]
    query_pos = torch.arange(past, past + T, device=q.device)[:, None]
    key_pos = torch.arange(S, device=q.device)[None, :]
    allowed = key_pos <= query_pos
    if sliding_window is not None:
        allowed &= (query_pos - key_pos) < sliding_window
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=gqa).transpose(1, 2)
