"""The LLaMA model of `llama.py` as a DeepSpeed `PipelineModule`, for the pipeline mode (PP × DP × TP).

    [embedding] → [block 0] … [block N-1] → [final norm] → [LM head]      one LayerSpec each

The pipe layers wrap the very modules `Llama` is built from (`VocabParallelEmbedding`, `Block`,
`RMSNorm`, `ColumnParallelLinear`), so tensor parallelism inside a stage is the same code, on the TP
group of `megakor.parallel`. What flows between stages is (hidden states, position_ids, cu_seqlens):
the packed documents, which every block needs for RoPE and its one varlen attention call (integers,
so DeepSpeed sends no gradient for them). cu_seqlens has one entry per document, so its length
changes from micro-batch to micro-batch: the module is built with DeepSpeed's `dynamic_shape`, which
sends each activation's shape along with it. The kernel's longest-document argument is the row length
T, an upper bound, which is all a varlen kernel needs. Labels reach the last stage through the
pipeline's label tuple: a micro-batch is ((input_ids, position_ids, cu_seqlens), labels).

The head layer returns (hidden, head weight) and `LlamaPipe.loss` computes the vocab-parallel chunked
cross-entropy from both, as `Llama.loss` does, so [tokens, vocab] logits never exist here either. With
tied embeddings the head is a `TiedLayerSpec` of the embedding layer: the first and last stages each
hold a copy, DeepSpeed all-reduces its gradient between them, and both copies take the same step.

Names: DeepSpeed calls each layer by its position in the spec list ("3.layers.2.mlp.up_proj.weight")
and a tied one "tied_modules.embed.…". Each pipe layer keeps Llama's attribute names below that
prefix, so dropping it gives the megakor name ("layers.2.mlp.up_proj.weight") and `checkpoint/hf.py`'s
one key map serves every layout.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch.utils.checkpoint import checkpoint

from megakor.model.args import ModelArgs
from megakor.model.attention import RotaryEmbedding
from megakor.model.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    lm_head_cross_entropy,
    padded_vocab_size,
    tp_world,
)
from megakor.model.llama import Block, RMSNorm

TIED_KEY = "embed"
# DeepSpeed's name for "balance the number of blocks": uniform over transformer blocks, with the
# embedding on the first stage and norm + head on the last (uniform over *specs* would count them
# as layers).
PARTITION_METHODS = {"parameters": "parameters", "uniform": "type:BlockPipe"}


class EmbeddingPipe(nn.Module):
    def __init__(self, args: ModelArgs, tp_group=None):
        super().__init__()
        _, tp = tp_world(tp_group)
        self.tok_embeddings = VocabParallelEmbedding(padded_vocab_size(args.vocab_size, tp), args.hidden_size, tp_group)

    def forward(self, inputs):
        input_ids, position_ids, cu_seqlens = inputs
        return self.tok_embeddings(input_ids), position_ids, cu_seqlens


class BlockPipe(nn.Module):
    """Block `index`, kept under `layers.{index}` so its parameters carry Llama's names."""

    def __init__(self, args: ModelArgs, index: int, tp_group=None, backend: str = "auto"):
        super().__init__()
        self.index = index
        self.layers = nn.ModuleDict({str(index): Block(args, tp_group, backend)})
        # cos/sin are recomputed per block from the position ids (cheap) instead of travelling between
        # stages: DeepSpeed would treat them as activations and send gradients back for them.
        self.rope = RotaryEmbedding(args)

    def forward(self, inputs):
        x, position_ids, cu_seqlens = inputs
        # RoPE gets no bound: dynamic NTK scaling must see the real longest document, as Llama's does.
        cos, sin = self.rope(position_ids, x.dtype)
        x = self.layers[str(self.index)](x, cos, sin, position_ids, None, cu_seqlens, x.shape[1])
        return x, position_ids, cu_seqlens


class NormPipe(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, inputs):
        return self.norm(inputs[0])


class HeadPipe(nn.Module):
    def __init__(self, args: ModelArgs, tp_group=None):
        super().__init__()
        _, tp = tp_world(tp_group)
        self.lm_head = ColumnParallelLinear(args.hidden_size, padded_vocab_size(args.vocab_size, tp), False, tp_group)

    def forward(self, hidden):
        return hidden, self.lm_head.weight


def _tied_head(embedding: EmbeddingPipe, hidden):
    return hidden, embedding.tok_embeddings.weight


def layer_specs(args: ModelArgs, tp_group=None, attention_backend: str = "auto") -> list[LayerSpec]:
    if args.tie_word_embeddings:
        first = TiedLayerSpec(TIED_KEY, EmbeddingPipe, args, tp_group, tied_weight_attr=["tok_embeddings.weight"])
        head = TiedLayerSpec(TIED_KEY, EmbeddingPipe, args, tp_group, forward_fn=_tied_head,
                             tied_weight_attr=["tok_embeddings.weight"])
    else:
        first, head = LayerSpec(EmbeddingPipe, args, tp_group), LayerSpec(HeadPipe, args, tp_group)
    blocks = [LayerSpec(BlockPipe, args, i, tp_group, attention_backend) for i in range(args.num_layers)]
    return [first, *blocks, LayerSpec(NormPipe, args), head]


def megakor_name(pipe_name: str) -> str:
    """"3.layers.2.mlp.up_proj.weight" → "layers.2.mlp.up_proj.weight";
    "tied_modules.embed.tok_embeddings.weight" → "tok_embeddings.weight"."""
    parts = pipe_name.split(".")
    return ".".join(parts[2:] if parts[0] == "tied_modules" else parts[1:])


def _spec_name(spec) -> str:
    if spec.typename is BlockPipe:
        return f"layer {spec.module_args[1]}"
    if isinstance(spec, TiedLayerSpec) and spec.forward_fn is not None:
        return "head (tied)"
    return {EmbeddingPipe: "embedding", NormPipe: "norm", HeadPipe: "head"}[spec.typename]


class LlamaPipe(PipelineModule):
    """One pipeline stage of the model (DeepSpeed builds only this stage's layers).

    `loss_scale` multiplies the summed NLL each micro-batch back-propagates (the trainer sets it per
    step, see `megakor.train.loop`); `nll_sum` accumulates the unscaled NLL of the micro-batches this
    stage computed the loss of (float64, last stage only) for logging and evaluation."""

    def __init__(self, args: ModelArgs, topology, tp_group=None, attention_backend: str = "auto",
                 loss_chunk_tokens: int = 1024, activation_checkpointing: bool = False,
                 partition: str = "parameters"):
        super().__init__(
            layer_specs(args, tp_group, attention_backend), topology=topology, loss_fn=self.loss,
            partition_method=PARTITION_METHODS[partition],
            # One block per checkpointed segment, as Llama does; the embedding (integer inputs), the
            # norm and the head are never recomputed.
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
            activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
            checkpointable_layers=["BlockPipe"], dynamic_shape=True)
        self.args, self.tp_group, self.loss_chunk_tokens = args, tp_group, loss_chunk_tokens
        self.loss_scale = 1.0
        self.nll_sum = torch.zeros((), dtype=torch.float64)

    # -- layout ------------------------------------------------------------------------------------
    def describe_stages(self) -> str:
        """e.g. "[embedding, layer 0] | [layer 1, norm, head]"."""
        stages = (self._layer_specs[self.parts[i]:self.parts[i + 1]] for i in range(self.num_stages))
        return " | ".join("[" + ", ".join(map(_spec_name, specs)) + "]" for specs in stages)

    def megakor_parameters(self, tied_copies: bool = False) -> dict[str, nn.Parameter]:
        """This stage's parameters by megakor name. The last stage's copy of a tied embedding (the one
        DeepSpeed marks `ds_pipe_replicated`) is left out unless `tied_copies`: exports take the first
        stage's."""
        return {megakor_name(n): p for n, p in self.named_parameters()
                if tied_copies or not getattr(p, "ds_pipe_replicated", False)}

    # -- loss --------------------------------------------------------------------------------------
    def loss(self, outputs, labels):
        hidden, head_weight = outputs
        nll = lm_head_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head_weight, labels.reshape(-1),
                                    self.args.vocab_size, self.loss_chunk_tokens, self.tp_group, "sum")
        self.nll_sum = self.nll_sum.to(nll.device) + nll.detach().double()
        return nll * self.loss_scale


def run_pipeline(engine, micro_batches: list[tuple[torch.Tensor, ...]], ps, loss_scale) -> torch.Tensor:
    """Σ NLL (float64) of this pipeline's micro-batches, each (input_ids, position_ids, padded cu_seqlens,
    labels), returned
    on every stage. With a `loss_scale`: one training step, DeepSpeed's 1F1B schedule over all of them
    back-propagating NLL × loss_scale, then the optimizer step (`train_batch`). With None: forward only
    (`eval_batch`). Every rank of the pipeline calls it with the same number of micro-batches."""
    module = engine.module
    module.nll_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    data = iter([((ids, pos, cu), labels) for ids, pos, cu, labels in micro_batches])
    if loss_scale is None:
        module.loss_scale = 1.0
        engine.eval_batch(data, num_micro_batches=len(micro_batches), reduce_output=None, bcast_loss=False)
    else:
        module.loss_scale = loss_scale
        engine.train_batch(data)
    total = module.nll_sum  # zero except on the last stage
    dist.broadcast(total, src=ps.topology.rank(ps.pp - 1, ps.dp_rank, ps.tp_rank), group=ps.pp_group)
    return total
