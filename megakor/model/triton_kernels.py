"""Fused Triton kernels for RMSNorm, SwiGLU and rotary embeddings, forward and backward.

`kernels.py` calls `rms_norm`, `swiglu` and `rope` from here on CUDA tensors (or everywhere with
`MEGAKOR_KERNELS=triton`). Each is a `torch.autograd.Function` whose forward and backward are one
Triton launch each (RMSNorm's weight gradient adds a `.sum` over per-program partials). They
reproduce the PyTorch references in `kernels.py`:

- every kernel loads its inputs, computes in fp32 and rounds once when it stores;
- RMSNorm rounds the normalised row to x's dtype *before* the weight multiply, as
  transformers' LlamaRMSNorm does, so the result dtype is `promote_types(weight, x)`;
- RoPE uses the rotate-half layout (first half of a head pairs with the second half).

On CPU the kernels run under Triton's interpreter, which needs `TRITON_INTERPRET=1` in the
environment *before this module is imported* (Triton decides at `@triton.jit` time). The
interpreter rounds fp32 -> bf16 by truncation where a GPU rounds to nearest even, so bf16 results
differ from the GPU's by at most one bf16 ulp; fp32 results are the same.

Importing this module raises ImportError when Triton cannot be imported, so `kernels.py` falls back
to PyTorch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception as exc:  # noqa: BLE001 - a broken install (missing driver libs) is as good as none
    raise ImportError(f"megakor.model.triton_kernels needs Triton ({exc}); install the `gpu` extra") from exc


# Rows wider than this do not fit one program's registers/shared memory; none of our models get close
# (hidden sizes are <= 16384).
MAX_FUSED_SIZE = 65536


def _num_warps(block: int) -> int:
    """Warps for a program that owns `block` elements: enough threads to keep ~8 elements each."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


# The kernels call only Triton builtins (`tl.reduce`, `tl.exp`, `tl.full`), not `tl.sum`, `tl.sigmoid`
# or `tl.zeros`: those are themselves @triton.jit functions, compiled or interpreted as decided when
# `triton` was first imported. Built from builtins, our kernels run in the interpreter whenever *this*
# module was imported under TRITON_INTERPRET=1, even if something imported triton earlier (pytest
# imports every test module before running any). The generated code is the same as tl.sum's and
# tl.sigmoid's.

@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_sum(x):
    return tl.reduce(x, 0, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


# ---- RMSNorm --------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, out_ptr, rstd_ptr, x_row_stride, out_row_stride, n_cols, eps,
                         BLOCK: tl.constexpr):
    # One program per row. Offsets in int64: rows x D can pass 2^31 elements at long context.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    # Masked lanes load 0, so they add nothing to the sum of squares; divide by the true width.
    mean_sq = _row_sum(x * x) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)
    tl.store(rstd_ptr + row, rstd)
    # Round the normalised row to x's dtype first (the reference's `h.to(dtype)`), then multiply by the
    # weight in fp32; a bf16 x bf16 product is exact in fp32, so one rounding at the store matches
    # PyTorch's bf16 multiply.
    h = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dout_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                         dout_row_stride, x_row_stride, dx_row_stride, n_rows, n_cols, rows_per_program,
                         BLOCK: tl.constexpr):
    # Each program walks a contiguous run of rows, accumulating its share of dweight in fp32
    # registers; the host sums the per-program partials (one [programs, D] fp32 buffer).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.full([BLOCK], 0.0, tl.float32)
    # int64 bounds make the loop variable int64, so row offsets cannot overflow.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + row * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        # y = w * round(x_hat); the rounding is the identity for gradients (as autograd treats `.to`).
        # dweight sees the rounded row, exactly what the reference multiplied by.
        dw_acc += dout * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        # d x_hat = dout * w;  dx = rstd * (d x_hat - x_hat * mean(d x_hat * x_hat)).
        g = dout * w
        dx = rstd * (g - x_hat * (_row_sum(g * x_hat) / n_cols))
        tl.store(dx_ptr + row * dx_row_stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _programs_for_rows(n_rows: int, device: torch.device) -> int:
    """How many programs share the rows of a backward pass: a couple per SM on a GPU (so the partial
    dweight buffer stays small), a few on CPU where the interpreter runs programs one by one."""
    if device.type == "cuda":
        per_device = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        per_device = 4
    return max(1, min(n_rows, per_device))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        D = x.shape[-1]
        if weight.shape != (D,):
            raise ValueError(f"rms_norm weight has shape {tuple(weight.shape)}; expected ({D},) for x of shape {tuple(x.shape)}")
        block = triton.next_power_of_2(D)
        if block > MAX_FUSED_SIZE:
            raise ValueError(f"rms_norm row width {D} exceeds {MAX_FUSED_SIZE}; use MEGAKOR_KERNELS=torch")
        x2d = x.reshape(-1, D)
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        weight = weight.contiguous()
        n_rows = x2d.shape[0]
        out = torch.empty((n_rows, D), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            _rms_norm_fwd_kernel[(n_rows,)](x2d, weight, out, rstd, x2d.stride(0), out.stride(0), D, eps,
                                           BLOCK=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.block, ctx.x_shape = block, x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dout):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, D = x2d.shape
        dout2d = dout.reshape(-1, D)
        if dout2d.stride(-1) != 1:
            dout2d = dout2d.contiguous()
        dx = torch.empty_like(x2d)
        programs = _programs_for_rows(n_rows, x2d.device)
        dw_partial = torch.zeros((programs, D), dtype=torch.float32, device=x2d.device)
        if n_rows:
            _rms_norm_bwd_kernel[(programs,)](dout2d, x2d, weight, rstd, dx, dw_partial,
                                             dout2d.stride(0), x2d.stride(0), dx.stride(0), n_rows, D,
                                             triton.cdiv(n_rows, programs),
                                             BLOCK=ctx.block, num_warps=_num_warps(ctx.block))
        dweight = dw_partial.sum(0).to(weight.dtype)
        return dx.view(ctx.x_shape), dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., D] with weight [D]; see `kernels.rms_norm_reference`."""
    _check_device(x, weight)
    return _RMSNorm.apply(x, weight, float(eps))


# ---- SwiGLU ---------------------------------------------------------------------------------------

SWIGLU_BLOCK = 1024  # elements per program; the kernel is memory-bound, any multiple of 128 does


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * _sigmoid(g) * u
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_elements, BLOCK: tl.constexpr):
    # Recompute silu from the saved inputs instead of saving the activation: one less [N, F] tensor.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    silu = g * sig
    # d silu(g) / dg = sig + g * sig * (1 - sig) = sig * (1 + g * (1 - sig))
    dgate = dout * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_ptr + offs, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dout * silu).to(dup_ptr.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu needs gate and up of one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
        n = gate.numel()
        if n:
            _swiglu_fwd_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](gate, up, out, n, BLOCK=SWIGLU_BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        if n:
            _swiglu_bwd_kernel[(triton.cdiv(n, SWIGLU_BLOCK),)](dout, gate, up, dgate, dup, n, BLOCK=SWIGLU_BLOCK)
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; see `kernels.swiglu_reference`."""
    _check_device(gate, up)
    return _SwiGLU.apply(gate, up)


# ---- RoPE -----------------------------------------------------------------------------------------

@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, H, half,
                 x_sb, x_st, x_sh, x_sd, c_sb, c_st, c_sd, s_sb, s_st, s_sd, o_sb, o_st, o_sh, o_sd,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    # One program per (batch, position): cos/sin are loaded once and applied to every head as a
    # [heads, D/2] tile. All addressing goes through strides, so x may be any strided view.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < half
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < H) & col_mask[None, :]

    c_row = cos_ptr + b * c_sb + t * c_st
    s_row = sin_ptr + b * s_sb + t * s_st
    cos1 = tl.load(c_row + cols * c_sd, mask=col_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(c_row + (cols + half) * c_sd, mask=col_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(s_row + cols * s_sd, mask=col_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(s_row + (cols + half) * s_sd, mask=col_mask, other=0.0).to(tl.float32)

    # Forward, with x = [x1, x2] and rotate_half(x) = [-x2, x1]:
    #   out1 = x1 * cos1 - x2 * sin1,   out2 = x2 * cos2 + x1 * sin2.
    # rotate_half is a linear map R with Rᵀ[y1, y2] = [y2, -y1], so the backward
    # dx = dout * cos + Rᵀ(dout * sin) reads
    #   dx1 = d1 * cos1 + d2 * sin2,    dx2 = d2 * cos2 - d1 * sin1,
    # which is the forward formula with (sin1, sin2) replaced by (-sin2, -sin1).
    if BACKWARD:
        rot1 = -sin2
        rot2 = -sin1
    else:
        rot1 = sin1
        rot2 = sin2

    x_row = x_ptr + b * x_sb + t * x_st + heads[:, None] * x_sh
    x1 = tl.load(x_row + cols[None, :] * x_sd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + (cols[None, :] + half) * x_sd, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos1[None, :] - x2 * rot1[None, :]
    out2 = x2 * cos2[None, :] + x1 * rot2[None, :]

    o_row = out_ptr + b * o_sb + t * o_st + heads[:, None] * o_sh
    tl.store(o_row + cols[None, :] * o_sd, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + (cols[None, :] + half) * o_sd, out2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, backward: bool):
    B, T, H, D = x.shape
    half = D // 2
    block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(half)
    if B * T:
        _rope_kernel[(B * T,)](x, cos, sin, out, T, H, half, *x.stride(), *cos.stride(), *sin.stride(), *out.stride(),
                               BLOCK_H=block_h, BLOCK_HALF=block_half, BACKWARD=backward,
                               num_warps=_num_warps(block_h * block_half))


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        if x.dim() != 4 or x.shape[-1] % 2:
            raise ValueError(f"rope needs x of shape [B, T, H, D] with even D; got {tuple(x.shape)}")
        B, T, H, D = x.shape
        if cos.shape != (B, T, D) or sin.shape != (B, T, D):
            raise ValueError(f"rope needs cos/sin of shape {(B, T, D)}; got {tuple(cos.shape)} and {tuple(sin.shape)}")
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
        _launch_rope(x, cos, sin, out, backward=False)
        # cos/sin come from a buffer and never need gradients in the model; keep x only if they do.
        ctx.cos_sin_need_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(cos, sin, x if ctx.cos_sin_need_grad else None)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        cos, sin, x = ctx.saved_tensors
        dx = torch.empty(dout.shape, dtype=ctx.x_dtype, device=dout.device)
        _launch_rope(dout, cos, sin, dx, backward=True)
        dcos = dsin = None
        if ctx.cos_sin_need_grad:
            # Off the hot path (position tables are not trained): plain PyTorch, summed over heads.
            x1, x2 = x.float().chunk(2, dim=-1)
            d = dout.float()
            dcos = (d * x.float()).sum(2).to(cos.dtype)
            dsin = (d * torch.cat((-x2, x1), dim=-1)).sum(2).to(sin.dtype)
        return dx, dcos, dsin


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, T, H, D] (any strides) with cos/sin [B, T, D], rotate-half layout;
    see `kernels.rope_reference`."""
    _check_device(x, cos, sin)
    return _RoPE.apply(x, cos, sin)


# ---- device check ---------------------------------------------------------------------------------

# With TRITON_INTERPRET=1 at import time, `@triton.jit` returns interpreter functions instead of
# JITFunctions; only those can run on CPU tensors.
INTERPRETED = not isinstance(_swiglu_fwd_kernel, triton.runtime.JITFunction)


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"Triton kernels need all inputs on one device; got {[str(t.device) for t in tensors]}")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "Triton kernels got CPU tensors; set TRITON_INTERPRET=1 before megakor is imported to run them "
            "in Triton's interpreter, or MEGAKOR_KERNELS=torch for the PyTorch kernels"
        )


__all__ = ["rms_norm", "swiglu", "rope", "INTERPRETED"]
