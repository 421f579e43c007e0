"""Megatron-style tensor-parallel layers and the vocab-parallel chunked LM-head cross-entropy.

With no tensor-parallel group (TP = 1) every class is the plain layer it names, so the single-process
model and the parallel model are the same code. Shapes follow Megatron:

- `ColumnParallelLinear` splits the output features: each rank computes its slice of heads / FFN units.
- `RowParallelLinear` splits the input features and all-reduces the partial outputs.
- `VocabParallelEmbedding` splits the (padded) vocabulary rows; out-of-range ids contribute zeros.
- `lm_head_cross_entropy` projects hidden states onto the rank's vocabulary slice chunk by chunk and
  computes cross-entropy across ranks without ever holding full-vocabulary logits for all tokens.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def tp_world(group) -> tuple[int, int]:
    """(rank, size) inside a tensor-parallel group; (0, 1) without one."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Vocabulary padded to a multiple of `multiple * tp_size` rows so every TP rank holds an equal,
    aligned slice (Megatron's `make-vocab-size-divisible-by`). Padding rows are masked out of the loss."""
    m = multiple * tp_size
    return int(math.ceil(vocab_size / m) * m)


# ---- autograd-aware collectives (identity when the group is None) ---------------------------------

class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient (inputs to a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Forward: all-reduce the partial sums. Backward: identity (outputs of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x, group):
    return x if group is None or dist.get_world_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x, group):
    return x if group is None or dist.get_world_size(group) == 1 else _ReduceFromTP.apply(x, group)


# ---- layers ---------------------------------------------------------------------------------------

class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W split along the output dimension; output stays split (no gather)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_group=None):
        super().__init__()
        _, size = tp_world(tp_group)
        if out_features % size:
            raise ValueError(f"output features {out_features} are not divisible by tensor parallel size {size}")
        self.tp_group = tp_group
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // size, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features // size)) if bias else None

    def forward(self, x):
        return F.linear(copy_to_tp(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W split along the input dimension; partial outputs are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp_group=None):
        super().__init__()
        _, size = tp_world(tp_group)
        if in_features % size:
            raise ValueError(f"input features {in_features} are not divisible by tensor parallel size {size}")
        self.tp_group = tp_group
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        y = reduce_from_tp(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding over the padded vocabulary; rank r owns rows [r·V/tp, (r+1)·V/tp)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_group=None):
        super().__init__()
        rank, size = tp_world(tp_group)
        self.tp_group = tp_group
        self.num_embeddings = num_embeddings  # padded, whole vocabulary
        self.per_rank = num_embeddings // size
        self.vocab_start = rank * self.per_rank
        self.first_trainable_row: int | None = None  # see rows_trainable_from
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim))

    def forward(self, ids):
        weight = rows_trainable_from(self.weight, self.first_trainable_row, self.vocab_start)
        if self.tp_group is None or dist.get_world_size(self.tp_group) == 1:
            return F.embedding(ids, weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.tp_group)


def rows_trainable_from(weight: torch.Tensor, first_row: int | None, row_offset: int = 0) -> torch.Tensor:
    """`weight` with its rows below global row `first_row` cut off from autograd: they receive exactly
    zero gradient (stage 1 of vocabulary extension trains only the new tokens' rows). `row_offset` is
    the global index of this rank's first row (vocab-parallel slices). Masking in the graph, rather
    than in a gradient hook, holds under ZeRO-3 partitioning, TP and pipeline stages alike."""
    if first_row is None:
        return weight
    k = min(max(first_row - row_offset, 0), weight.shape[0])
    return weight if k == 0 else torch.cat([weight[:k].detach(), weight[k:]])


# ---- LM head + cross-entropy, chunked and vocab-parallel ------------------------------------------

def _all_reduce(x, op, group):
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def _chunk_stats(h, weight, labels, vocab_start, vocab_size, group):
    """Logits of one chunk on this rank's vocabulary slice, with the global log-sum-exp and the
    target logit. Returns (logits_fp32, lse, target_logit, local_target, target_here)."""
    # Softmax statistics in at least fp32 (bf16 logits lose the target's probability mass).
    logits = F.linear(h, weight)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    per_rank = weight.shape[0]
    # Padding rows of the last rank never win a softmax.
    real = vocab_size - vocab_start
    if real < per_rank:
        logits[:, max(real, 0):] = float("-inf")
    local_max = logits.max(dim=-1).values
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    sum_exp = (logits - global_max.unsqueeze(-1)).exp_().sum(-1)
    sum_exp = _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
    lse = global_max + torch.log(sum_exp)
    local_target = labels - vocab_start
    target_here = (local_target >= 0) & (local_target < per_rank)
    safe = local_target.clamp(0, per_rank - 1)
    target_logit = logits.gather(1, safe.unsqueeze(1)).squeeze(1) * target_here
    target_logit = _all_reduce(target_logit, dist.ReduceOp.SUM, group)
    return logits, lse, target_logit, safe, target_here


class _ChunkedLMHeadCE(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weightᵀ` against `labels` (ignore_index -100).

    Memory: only one chunk of logits (chunk_tokens × V/tp, fp32) lives at a time. The gradients of
    the hidden states and the weight are computed in the forward pass, chunk by chunk, as Liger's
    fused-linear-cross-entropy does: recomputing the logits in backward would cost a third matmul.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, vocab_size, chunk_tokens, group):
        needs_grad = hidden.requires_grad or weight.requires_grad
        valid = labels != -100
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        total = hidden.new_zeros((), dtype=acc_dtype)
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs_grad else None
        for s in range(0, hidden.shape[0], chunk_tokens):
            # No skipping of fully ignored chunks: asking the device whether a chunk has labels is a sync.
            h, y, m = hidden[s:s + chunk_tokens], labels[s:s + chunk_tokens], valid[s:s + chunk_tokens]
            logits, lse, target_logit, safe, here = _chunk_stats(h, weight, y.clamp_min(0), vocab_start, vocab_size, group)
            total += ((lse - target_logit) * m).sum()
            if needs_grad:
                # d loss / d logits = softmax - onehot, zero on ignored tokens.
                g = logits.sub_(lse.unsqueeze(-1)).exp_()  # in place: one chunk of logits alive at a time
                g.scatter_add_(1, safe.unsqueeze(1), -(here & m).to(g.dtype).unsqueeze(1))
                g *= m.unsqueeze(1)
                g = g.to(hidden.dtype)
                grad_hidden[s:s + chunk_tokens] = g @ weight
                grad_weight += (g.t() @ h).to(acc_dtype)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            ctx.group = group
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scale in place: a second weight-sized buffer is exactly what this function exists to avoid.
        grad_hidden.mul_(grad_out)
        grad_weight.mul_(grad_out)
        # Each TP rank holds a partial d/d hidden (its vocabulary slice): sum them.
        grad_hidden = _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        return grad_hidden, grad_weight, None, None, None, None, None


def lm_head_cross_entropy(hidden, weight, labels, vocab_size: int, chunk_tokens: int = 1024, tp_group=None,
                          reduction: str = "sum"):
    """Cross-entropy of the LM head without materialising [tokens, vocab] logits.

    hidden: [N, D] (already gathered across TP: every TP rank passes the same hidden states);
    weight: this rank's vocabulary slice [V/tp, D]; labels: [N] int64 with -100 = ignore;
    vocab_size: the real vocabulary (rows at or above it are padding). Returns the summed loss in fp32
    (or the mean over non-ignored tokens with reduction="mean").
    """
    rank, _ = tp_world(tp_group)
    vocab_start = rank * weight.shape[0]
    loss = _ChunkedLMHeadCE.apply(hidden, weight, labels, vocab_start, vocab_size, chunk_tokens, tp_group)
    if reduction == "mean":
        return loss / (labels != -100).sum().clamp_min(1)
    return loss



class _ChunkedLMHeadKL(torch.autograd.Function):
    """Summed KL(teacher ‖ student) over the vocabulary, per masked token, of two LM heads (TP = 1).

    The student's logits are `hidden @ weightᵀ`, the teacher's `teacher_hidden @ teacher_weightᵀ`
    (no gradient). As in `_ChunkedLMHeadCE`, one chunk of logits lives at a time and the student's
    gradients are computed in the forward pass: d KL / d logits = softmax(student) − softmax(teacher),
    cross-entropy's gradient with the teacher's distribution in place of the one-hot label.

    Both heads' logits are computed in fp32, from fp32 copies of the heads and hidden states: the
    student starts as the teacher and drifts from it by less than bf16's rounding of a logit (±0.06 at
    20), so bf16 logits would make the KL and its gradient mostly rounding noise.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, mask, vocab_size, chunk_tokens):
        needs_grad = hidden.requires_grad or weight.requires_grad
        acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
        # Padding rows (at or above vocab_size) are no word of either model: left out of both softmaxes.
        w, tw = weight[:vocab_size].to(acc_dtype), teacher_weight[:vocab_size].to(acc_dtype)
        total = hidden.new_zeros((), dtype=acc_dtype)
        grad_hidden = torch.zeros_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs_grad else None
        for s in range(0, hidden.shape[0], chunk_tokens):
            h, m = hidden[s:s + chunk_tokens].to(acc_dtype), mask[s:s + chunk_tokens].to(acc_dtype).unsqueeze(1)
            log_q = F.linear(h, w).log_softmax(-1)
            log_p = F.linear(teacher_hidden[s:s + chunk_tokens].to(acc_dtype), tw).log_softmax(-1)
            p = log_p.exp()
            total += (p * (log_p - log_q) * m).sum()
            if needs_grad:
                g = log_q.exp_().sub_(p).mul_(m)  # in place: log_q's buffer becomes the gradient
                grad_hidden[s:s + chunk_tokens] = (g @ w).to(hidden.dtype)
                grad_weight[:vocab_size] += g.t() @ h
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
            ctx.group = None  # the whole head on this rank: no partial d/d hidden to sum
        return total

    # The gradients were computed in the forward: scale them, as the cross-entropy does.
    backward = staticmethod(_ChunkedLMHeadCE.backward)


def lm_head_distill_kl(hidden, weight, teacher_hidden, teacher_weight, mask, vocab_size: int,
                       chunk_tokens: int = 1024):
    """Σ over tokens where `mask` of KL(teacher ‖ student) between the two LM heads' next-token
    distributions (self-distillation against forgetting), without materialising [tokens, vocab] logits.

    hidden, teacher_hidden: [N, D]; weight, teacher_weight: the full heads [V(+padding), D] (TP = 1);
    mask: [N] bool. The result is in fp32; only the student (hidden, weight) gets gradients.
    """
    return _ChunkedLMHeadKL.apply(hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), mask,
                                  vocab_size, chunk_tokens)
