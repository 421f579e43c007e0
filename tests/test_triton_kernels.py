"""Triton kernels (RMSNorm, SwiGLU, RoPE) against the PyTorch references in `kernels.py`, forward and
backward, on CPU through Triton's interpreter.

Tolerances: fp32 rtol = atol = 1e-5 (the kernels differ from PyTorch only in reduction order).
bf16 rtol = 1.6e-2 (torch.testing's bf16 default, ~2 ulp) and atol = 1e-2 x the largest reference
element: both sides round to bf16, PyTorch after every op and to nearest, the interpreter once per
output but by truncation, so elements may differ by one to two bf16 ulps. The atol is scaled because
of RMSNorm's dweight: the reference rounds every per-row product dout * h to bf16 before summing, so
a sum of cancelling terms is only as exact as its largest term, not as its own (small) value.
"""

import os

# Triton decides at `@triton.jit` time whether a kernel is compiled or interpreted, so this must be set
# before megakor.model.triton_kernels is imported.
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels need `triton` (the `gpu` extra); CPU runs use PyTorch")

# pytest imports every test module before running any, so an earlier one may have imported megakor (and
# with it triton_kernels, compiled-mode) already: re-run the module so its kernels are interpreted.
if "megakor.model.triton_kernels" in sys.modules:
    importlib.reload(sys.modules["megakor.model.triton_kernels"])

from megakor.model import kernels  # noqa: E402
from megakor.model import triton_kernels as tk  # noqa: E402
from megakor.model.args import preset  # noqa: E402
from megakor.model.kernels import rms_norm_reference, rope_reference, swiglu_reference  # noqa: E402
from megakor.model.llama import Llama  # noqa: E402

# The interpreter runs bf16 too: it stores bf16 as uint16 and converts to fp32 exactly (back by truncation).
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:
        tol["atol"] *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, **tol)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _run(fn, inputs, grad_out_seed=0):
    """fn(*inputs) and the gradients of <fn(*inputs), g> for a fixed random g, as (out, [grads])."""
    leaves = [_leaf(t) if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out.dtype)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


def _compare(fn, ref, inputs, dtype):
    out, grads = _run(fn, inputs)
    ref_out, ref_grads = _run(ref, inputs)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    _assert_close(out, ref_out, dtype)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert g.dtype == rg.dtype
        _assert_close(g, rg, dtype)


def test_interpreter_active():
    assert tk.INTERPRETED, "TRITON_INTERPRET=1 was not seen when triton_kernels was imported"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 576), (3, 100)])  # 576: SmolLM2's hidden size
def test_rms_norm(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    _compare(lambda a, w: tk.rms_norm(a, w, 1e-6), lambda a, w: rms_norm_reference(a, w, 1e-6), [x, weight], dtype)


def test_rms_norm_fp32_weight_on_bf16_input():
    # `weight * h.to(dtype)`: an fp32 weight on bf16 activations gives an fp32 result (type promotion),
    # computed from the bf16-rounded normalised row.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 96, generator=gen).to(torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(96, generator=gen)
    out, (dx, dw) = _run(lambda a, w: tk.rms_norm(a, w, 1e-5), [x, weight])
    ref, (rdx, rdw) = _run(lambda a, w: rms_norm_reference(a, w, 1e-5), [x, weight])
    assert out.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    for a, b in [(out, ref), (dx, rdx), (dw, rdw)]:
        _assert_close(a, b, torch.bfloat16)
    # The normalised row was rounded to bf16 before the fp32 multiply: out / weight sits on the bf16
    # grid up to fp32 division error (unrounded, it would be off the grid by up to 2^-9 relative).
    h = out / weight
    torch.testing.assert_close(h, h.to(torch.bfloat16).float(), rtol=1e-6, atol=0)


def test_rms_norm_non_contiguous_input():
    x = torch.randn(4, 3, 80)[:, :, :64].transpose(0, 1)  # strided rows, strided leading dims
    weight = 1 + 0.1 * torch.randn(64)
    _compare(lambda a, w: tk.rms_norm(a, w, 1e-5), lambda a, w: rms_norm_reference(a, w, 1e-5), [x, weight],
             torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 176), (2, 5, 1536), (1, 3000)])  # 3000: more than one program, ragged tail
def test_swiglu(shape, dtype):
    gen = torch.Generator().manual_seed(3)
    gate = (torch.randn(shape, generator=gen) * 3).to(dtype)
    up = torch.randn(shape, generator=gen).to(dtype)
    _compare(tk.swiglu, swiglu_reference, [gate, up], dtype)


def _cos_sin(B, T, D, dtype, gen):
    # Real RoPE tables (duplicated halves) plus noise, so the kernel cannot rely on cos1 == cos2.
    pos = torch.randint(0, 100, (B, T), generator=gen).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = (pos[..., None] * inv_freq).repeat(1, 1, 2)
    noise = 0.01 * torch.randn(2, B, T, D, generator=gen)
    return (emb.cos() + noise[0]).to(dtype), (emb.sin() + noise[1]).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D", [(2, 5, 4, 16), (1, 3, 3, 64), (2, 2, 2, 96), (1, 2, 9, 128)])
def test_rope(B, T, H, D, dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, H, D, generator=gen).to(dtype)
    cos, sin = _cos_sin(B, T, D, dtype, gen)
    _compare(tk.rope, rope_reference, [x, cos, sin], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_non_contiguous(dtype):
    # A fused-qkv style projection: q is a strided slice of [B, T, 3*H*D], viewed as heads; cos/sin are
    # one position table expanded over the batch (stride 0).
    B, T, H, D = 2, 4, 3, 32
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(dtype)
    cos, sin = _cos_sin(1, T, D, dtype, gen)
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)

    def through(fn):
        def run(qkv_leaf, c, s):
            q = qkv_leaf.view(B, T, 3, H, D)[:, :, 1]  # the middle third: not contiguous
            assert not q.is_contiguous()
            return fn(q, c, s)
        return run

    _compare(through(tk.rope), through(rope_reference), [qkv, cos, sin], dtype)


def test_rope_cos_sin_gradients():
    # Not used by the model (the tables are buffers), but the Function must not drop these gradients.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 2, 16, generator=gen)
    cos, sin = _cos_sin(2, 3, 16, torch.float32, gen)
    out, grads = _run(tk.rope, [x, cos, sin])
    _, ref_grads = _run(rope_reference, [x, cos, sin])
    assert len(grads) == 3
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL[torch.float32])


def test_import_error_without_triton(monkeypatch):
    # kernels.py treats an ImportError from this module as "use PyTorch".
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_tk_without_triton", tk.__file__)
    with pytest.raises(ImportError, match="needs Triton"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_kernels_dispatch_to_triton(monkeypatch):
    assert kernels._tk is tk
    calls = []
    for name in ("rms_norm", "swiglu", "rope"):
        real = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(3, 64, generator=gen), torch.randn(64, generator=gen)
    q = torch.randn(1, 3, 2, 16, generator=gen)
    cos, sin = _cos_sin(1, 3, 16, torch.float32, gen)

    monkeypatch.setenv("MEGAKOR_KERNELS", "torch")
    torch_out = [kernels.rms_norm(x, w, 1e-5), kernels.swiglu(x, w.expand(3, 64)), kernels.apply_rope(q, cos, sin)]
    assert calls == []
    monkeypatch.setenv("MEGAKOR_KERNELS", "triton")
    triton_out = [kernels.rms_norm(x, w, 1e-5), kernels.swiglu(x, w.expand(3, 64)), kernels.apply_rope(q, cos, sin)]
    assert calls == ["rms_norm", "swiglu", "rope"]
    for a, b in zip(triton_out, torch_out, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def _llama_loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_llama_triton_matches_torch(monkeypatch):
    torch.manual_seed(0)
    model = Llama(preset("debug"))
    model.init_weights(torch.Generator().manual_seed(0))
    # Non-trivial norm weights, so a dropped weight multiply or dweight term shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 12), generator=gen)
    labels = torch.randint(0, 512, (2, 12), generator=gen)

    monkeypatch.setenv("MEGAKOR_KERNELS", "torch")
    ref_loss, ref_grads = _llama_loss_and_grads(model, ids, labels)
    monkeypatch.setenv("MEGAKOR_KERNELS", "triton")
    calls = []
    monkeypatch.setattr(tk, "_check_device", lambda *t: calls.append(len(t)))
    loss, grads = _llama_loss_and_grads(model, ids, labels)

    # 2 layers x (2 norms + 1 swiglu + 2 ropes) + the final norm = 11 Triton calls.
    assert len(calls) == 11
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
