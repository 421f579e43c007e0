"""The LLaMA-class model (Llama 1/2/3.x, Mistral, Qwen2): read top to bottom, nanoGPT style.

    tokens → embedding → N × [RMSNorm → GQA attention (RoPE) → + → RMSNorm → SwiGLU MLP → +] → RMSNorm → LM head

Tensor parallelism is carried by the Megatron-named layers from `layers.py`; with `tp_group=None` they
are plain layers, so this one file is both the single-process and the parallel model. Labels are
already shifted (labels[t] is the token after input t; -100 = not predicted), so packed batches decide
themselves which positions are trained. Parameter names are kept stable across layouts: layers are
keyed "0".."N-1" and `checkpoint/hf.py` maps them to Hugging Face names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megakor.model.args import ModelArgs
from megakor.model.attention import RotaryEmbedding, attention, cached_attention, cu_seqlens_from_positions
from megakor.model.kernels import apply_rope, rms_norm, swiglu
from megakor.model.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    lm_head_cross_entropy,
    lm_head_distill_kl,
    padded_vocab_size,
    rows_trainable_from,
    tp_world,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp_group=None, backend: str = "auto"):
        super().__init__()
        _, tp = tp_world(tp_group)
        self.head_dim, self.backend, self.sliding_window = args.head_dim, backend, args.sliding_window
        self.local_heads, self.local_kv_heads = args.num_heads // tp, args.num_kv_heads // tp
        d, hd = args.hidden_size, args.head_dim
        self.q_proj = ColumnParallelLinear(d, args.num_heads * hd, args.attention_bias, tp_group)
        self.k_proj = ColumnParallelLinear(d, args.num_kv_heads * hd, args.attention_bias, tp_group)
        self.v_proj = ColumnParallelLinear(d, args.num_kv_heads * hd, args.attention_bias, tp_group)
        self.o_proj = RowParallelLinear(args.num_heads * hd, d, args.o_bias, tp_group)

    def forward(self, x, cos, sin, position_ids, kv_cache=None, cu_seqlens=None, max_seqlen=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.local_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.local_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.local_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None:
            y = attention(q, k, v, position_ids, self.sliding_window, self.backend, cu_seqlens, max_seqlen)
        else:  # generation: attend to this layer's cached keys/values as well (`megakor.generate.KVCache`)
            k, v, past = kv_cache.update(k, v)
            y = cached_attention(q, k, v, past, self.sliding_window)
        return self.o_proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, tp_group=None):
        super().__init__()
        d, f = args.hidden_size, args.intermediate_size
        self.gate_proj = ColumnParallelLinear(d, f, args.mlp_bias, tp_group)
        self.up_proj = ColumnParallelLinear(d, f, args.mlp_bias, tp_group)
        self.down_proj = RowParallelLinear(f, d, args.mlp_bias, tp_group)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, tp_group=None, backend: str = "auto"):
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args, tp_group, backend)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, tp_group)

    def forward(self, x, cos, sin, position_ids, kv_cache=None, cu_seqlens=None, max_seqlen=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, position_ids, kv_cache, cu_seqlens, max_seqlen)
        return x + self.mlp(self.ffn_norm(x))


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)


class Llama(nn.Module):
    def __init__(self, args: ModelArgs, tp_group=None, attention_backend: str = "auto",
                 loss_chunk_tokens: int = 1024, activation_checkpointing: bool = False):
        super().__init__()
        rank, tp = tp_world(tp_group)
        if args.num_heads % tp or args.num_kv_heads % tp:
            raise ValueError(
                f"tensor parallel size {tp} must divide num_heads={args.num_heads} and num_kv_heads={args.num_kv_heads}"
            )
        self.args, self.tp_group = args, tp_group
        self.loss_chunk_tokens, self.activation_checkpointing = loss_chunk_tokens, activation_checkpointing
        self.padded_vocab = padded_vocab_size(args.vocab_size, tp)
        self.tok_embeddings = VocabParallelEmbedding(self.padded_vocab, args.hidden_size, tp_group)
        self.layers = nn.ModuleDict({str(i): Block(args, tp_group, attention_backend) for i in range(args.num_layers)})
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        # A tied head reuses the embedding's vocabulary slice: same rows, same TP split.
        self.lm_head = None if args.tie_word_embeddings else ColumnParallelLinear(
            args.hidden_size, self.padded_vocab, False, tp_group)
        self.rope = RotaryEmbedding(args)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.lm_head is None else self.lm_head.weight

    def train_only_vocab_rows_from(self, first_row: int | None) -> None:
        """Stage 1 of vocabulary extension: embedding and head rows below `first_row` (the base
        vocabulary) get zero gradient; None trains every row again."""
        self.tok_embeddings.first_trainable_row = first_row

    def _head(self) -> torch.Tensor:
        # The head's vocabulary split is the embedding's, tied or not.
        return rows_trainable_from(self.head_weight, self.tok_embeddings.first_trainable_row,
                                   self.tok_embeddings.vocab_start)

    def init_weights(self, generator: torch.Generator | None = None):
        """Random init for presets: N(0, initializer_range) for matrices, ones for norms, zero biases."""
        std = self.args.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      kv_cache=None, cu_seqlens: torch.Tensor | None = None,
                      max_seqlen: int | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, D]. With a `kv_cache` (generation), `input_ids` continue the
        cached tokens and `position_ids` must say where; keys/values are appended to the cache.
        `cu_seqlens` / `max_seqlen`: the packed documents, from the data layer (`attention`)."""
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        if cu_seqlens is None and kv_cache is None and input_ids.is_cuda:
            # Callers without the data layer's metadata (evaluation, tests): derive it once, not per layer.
            cu_seqlens, max_seqlen = cu_seqlens_from_positions(position_ids)
        x = self.tok_embeddings(input_ids)
        cos, sin = self.rope(position_ids, x.dtype, max_seqlen)
        for name, block in self.layers.items():
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, position_ids, None, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = block(x, cos, sin, position_ids, None if kv_cache is None else kv_cache[name], cu_seqlens,
                          max_seqlen)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [B, T, vocab_size] (gathered across TP; for inference and tests)."""
        local = torch.nn.functional.linear(hidden, self._head())
        _, tp = tp_world(self.tp_group)
        if tp > 1:
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.contiguous(), group=self.tp_group)
            local = torch.cat(parts, dim=-1)
        return local[..., : self.args.vocab_size]

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy against pre-shifted labels, chunked so [tokens, vocab] logits never exist."""
        D = hidden.shape[-1]
        return lm_head_cross_entropy(hidden.reshape(-1, D), self._head(), labels.reshape(-1),
                                     self.args.vocab_size, self.loss_chunk_tokens, self.tp_group, reduction)

    def distill_loss(self, hidden: torch.Tensor, labels: torch.Tensor, teacher) -> torch.Tensor:
        """Summed loss of a micro-batch some of whose rows are scored against a teacher: cross-entropy on
        the labelled tokens of the other rows, KL(teacher ‖ model) on the labelled tokens of those rows.
        `teacher` is (the distilled rows' indices [b] int64, the other rows' indices, the teacher's final
        hidden states of the distilled rows [b, T, D], the teacher's head weight)."""
        rows, others, teacher_hidden, teacher_head = teacher
        if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            raise ValueError("distillation needs the whole LM head on one rank (parallel.tensor=1)")
        D = hidden.shape[-1]
        ce = self.loss(hidden.index_select(0, others), labels.index_select(0, others), reduction="sum")
        kl = lm_head_distill_kl(hidden.index_select(0, rows).reshape(-1, D), self._head(), teacher_hidden.reshape(-1, D),
                                teacher_head, labels.index_select(0, rows).reshape(-1) != -100, self.args.vocab_size,
                                self.loss_chunk_tokens)
        return ce + kl

    def forward(self, input_ids, position_ids=None, labels=None, reduction: str = "mean", cu_seqlens=None,
                max_seqlen: int | None = None, teacher=None):
        """Logits [B, T, V] without labels; with them the loss over labelled tokens, averaged (mean) or
        summed (sum: the trainer divides by the token count of the whole global batch). With `teacher`
        (see `distill_loss`; reduction sum) the teacher's rows are scored by KL instead of cross-entropy."""
        h = self.hidden_states(input_ids, position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if labels is None:
            return self.logits(h)
        if teacher is not None:
            if reduction != "sum":
                raise ValueError("a teacher's loss is summed: the trainer divides by the global batch's tokens")
            return self.distill_loss(h, labels, teacher)
        return self.loss(h, labels, reduction)
