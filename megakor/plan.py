"""Memory per GPU of a run, before it starts: model states per ZeRO stage, activations, loss buffers.

    python launch/plan.py configs/runs/llama3.1_8b_korean.yaml --nodes 4 --gpus-per-node 8 --arch llama3.1-8b

Precision is what megakor trains with on GPU: bf16 parameters, gradients and activations, fp32 master
weights and AdamW moments. Everything is per GPU, for the parameters one model-parallel rank holds:
each matrix split over TP (norms whole), and under pipeline parallelism the blocks of one stage plus the
embedding (first stage) or final norm and head (last stage), as DeepSpeed's partitioner places them.
The worst stage is reported.

Model states (bytes per parameter of the rank, N, with DP the data-parallel size):
- ZeRO-3 and ZeRO-2: DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs`,
  `estimate_zero2_model_states_mem_needs`), reproduced term for term with the rank's N and DP as the
  number of GPUs: ZeRO-3 4·largest_layer + 18·N/DP (offload optimizer: 4·largest + 2·N/DP; offload
  optimizer and params: 4·largest); ZeRO-2 2·N + 18·N/DP (offload: 2·N). The estimator does not credit
  parameter offload without optimizer offload, so neither does the plan.
- ZeRO-1 (no estimator): 2 (bf16 params) + 2 (bf16 grads) + 16/DP (fp32 grads, master, m, v);
  with optimizer offload the 16/DP move to CPU.
- ZeRO-0: 20 = 2 (bf16 params) + 2 (bf16 grads) + 4 (fp32 grads) + 4 (master) + 4 (m) + 4 (v): DeepSpeed's
  bf16 wrapper without ZeRO. (In pipeline mode its BF16_Optimizer shards the fp32 states over DP, so
  this is an upper bound there.)

Activations: bytes stored for backward per token of each LLaMA block, term by term, following the method
of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (their
sbh(34 + 5as/h) for GPT), redone for this block (`layer_activation_terms`). The loss buffers follow
`megakor.model.layers.lm_head_cross_entropy`. Not modelled: CUDA context, NCCL buffers, DeepSpeed's
communication buckets and allocator fragmentation; the verdict leaves room for them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from megakor.config import Config, ConfigError, distilled_sources, validate, validate_model_layout
from megakor.model.args import PRESETS, ModelArgs, preset
from megakor.model.layers import padded_vocab_size

GIB = 2**30
BF16 = 2  # bytes
FP32 = 4
# Share of GPU memory the plan may fill and still be called a fit: the rest is for what it does not
# model (CUDA context ~0.5 GiB, NCCL, DeepSpeed buckets, fragmentation).
FIT_FRACTION = 0.85
STATES, ACTIVATIONS, LOSS = "model states", "activations", "LM-head loss buffers"


# ---- the model as one model-parallel rank holds it -----------------------------------------------


def spec_parameters(args: ModelArgs, tp: int) -> list[tuple[str, int]]:
    """Parameters of one TP rank per pipeline layer spec, in `megakor.model.pipeline.layer_specs` order:
    embedding, blocks, final norm, head (a tied head is a second copy, as DeepSpeed counts it)."""
    d, hd, nq, nkv, inner = args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, args.intermediate_size
    vocab_rows = padded_vocab_size(args.vocab_size, tp) // tp
    attention = d * hd * (2 * nq + 2 * nkv) // tp
    if args.attention_bias:
        attention += hd * (nq + 2 * nkv) // tp
    if args.o_bias:
        attention += d  # a row-parallel bias is whole on every rank
    mlp = 3 * d * inner // tp + ((2 * inner // tp + d) if args.mlp_bias else 0)
    block = attention + mlp + 2 * d  # + two RMSNorm weights, whole on every rank
    return ([("embedding", vocab_rows * d)] + [(f"layer {i}", block) for i in range(args.num_layers)]
            + [("norm", d), ("head", vocab_rows * d)])


def largest_layer_parameters(args: ModelArgs, tp: int) -> int:
    """Largest single module (DeepSpeed's `largest_layer_params`: the most ZeRO-3 gathers at once)."""
    d, hd, inner = args.hidden_size, args.head_dim, args.intermediate_size
    vocab = padded_vocab_size(args.vocab_size, tp) * d // tp
    q_proj = d * args.num_heads * hd // tp + (args.num_heads * hd // tp if args.attention_bias else 0)
    gate_proj = d * inner // tp + (inner // tp if args.mlp_bias else 0)
    return max(vocab, q_proj, gate_proj)


def stage_boundaries(counts: list[int], stages: int, method: str) -> list[int]:
    """Spec index bounds of each stage, from DeepSpeed's own partitioner (`PipelineModule._partition_layers`
    with megakor's methods: "parameters", or "uniform" = balance blocks, i.e. "type:BlockPipe")."""
    if stages == 1:
        return [0, len(counts)]
    from deepspeed.runtime.utils import partition_balanced

    weights = counts if method == "parameters" else [0] + [1] * (len(counts) - 3) + [0, 0]
    return [int(b) for b in partition_balanced(weights=weights, num_parts=stages)]


# ---- model states --------------------------------------------------------------------------------


def model_states(params: int, zero_stage: int, dp: int, largest_layer: int = 0,
                 offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, int]:
    """GPU bytes of parameters, gradients, optimizer states (and ZeRO-3's gathered layer) of `params`
    parameters over `dp` data-parallel ranks. For ZeRO-2/3 the components sum exactly to DeepSpeed's
    estimator's gpu_mem (same integer arithmetic); the split between them is megakor's reading of it."""
    n = params
    if zero_stage == 3:
        gathered = 4 * largest_layer  # estimator's largest_layer_memory: the gathered layer, bf16 weight + grad
        if offload_optimizer and offload_params:
            return dict(parameters=0, gradients=0, optimizer=0, gathered=gathered)
        if offload_optimizer:
            return dict(parameters=int(2 * n / dp), gradients=0, optimizer=0, gathered=gathered)
        # 18·N/DP: bf16 params 2 + bf16 grads 2 + fp32 master, m, v 12 + 2 of fp32 gradient sub-group buffers.
        total = int(18 * n / dp)
        parameters, gradients = int(2 * n / dp), int(2 * n / dp)
        return dict(parameters=parameters, gradients=gradients, optimizer=total - parameters - gradients,
                    gathered=gathered)
    if zero_stage == 2:
        if offload_optimizer:
            return dict(parameters=2 * n, gradients=0, optimizer=0, gathered=0)
        # DeepSpeed: 18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer states, all partitioned over DP.
        total = int(18 * n / dp)
        gradients = int(6 * n / dp)
        return dict(parameters=2 * n, gradients=gradients, optimizer=total - gradients, gathered=0)
    if zero_stage == 1:
        return dict(parameters=2 * n, gradients=2 * n, optimizer=0 if offload_optimizer else int(16 * n / dp),
                    gathered=0)
    return dict(parameters=2 * n, gradients=2 * n, optimizer=16 * n, gathered=0)


def offloaded_cpu_bytes_per_rank(params: int, zero_stage: int, dp: int, offload_optimizer: bool,
                                 offload_params: bool) -> int:
    """CPU bytes one GPU's offloaded states take, with DeepSpeed's 1.5 buffer factor: the ZeRO-3
    estimator's zero_init figures (18 or 16 B/param over the GPUs) per rank; ZeRO-1/2: 16 B/param / DP."""
    if not offload_optimizer:
        return 0
    per_param = 18 if (zero_stage == 3 and offload_params) else 16
    return int(params * per_param / dp * 1.5)


# ---- activations ---------------------------------------------------------------------------------


def layer_activation_terms(args: ModelArgs, tp: int) -> dict[str, float]:
    """Bytes one LLaMA block stores for backward, per token, on one TP rank (bf16 unless noted).

    Method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", §4.1): list every tensor autograd keeps. Differences from their GPT block: a FlashAttention-
    style kernel keeps no s×s scores, softmax or dropout mask (their 5as/h term); LLaMA has no dropout;
    RMSNorm keeps its input and one fp32 1/rms per token; RoPE is linear in q/k, so its backward needs
    only cos/sin and the pre-RoPE q/k are not kept; GQA shrinks k/v to num_kv_heads; SwiGLU keeps gate,
    up and their product. megakor has no sequence parallelism, so norm inputs and the inputs of the
    column-parallel projections are whole on every TP rank (their 10sbh term), the rest split by TP.
    """
    h, hd, nq, nkv, inner = args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, args.intermediate_size
    return {
        "attention_norm input": BF16 * h,
        "attention_norm 1/rms (fp32)": FP32,
        "q/k/v projection input (norm output)": BF16 * h,
        "q after RoPE (attention input)": BF16 * nq * hd / tp,
        "k after RoPE (attention input)": BF16 * nkv * hd / tp,
        "v (attention input)": BF16 * nkv * hd / tp,
        # Shared by all blocks when one rank holds the model, recomputed per block in pipeline mode:
        # counting it per block over-counts the former by < 0.5%.
        "RoPE cos and sin": 2 * BF16 * hd,
        "attention output (kept by the kernel; also o_proj's input)": BF16 * nq * hd / tp,
        "attention log-sum-exp (fp32 per head)": FP32 * nq / tp,
        "ffn_norm input (residual stream)": BF16 * h,
        "ffn_norm 1/rms (fp32)": FP32,
        "gate/up projection input (norm output)": BF16 * h,
        "gate_proj output (SwiGLU backward)": BF16 * inner / tp,
        "up_proj output (SwiGLU backward)": BF16 * inner / tp,
        "silu(gate)·up (down_proj input)": BF16 * inner / tp,
    }


def layer_activation_bytes_per_token(args: ModelArgs, tp: int) -> float:
    return sum(layer_activation_terms(args, tp).values())


def activation_bytes(args: ModelArgs, tp: int, tokens: int, layers: int, in_flight: int,
                     checkpointing: bool) -> int:
    """Activations of a stage holding `layers` blocks with `in_flight` micro-batches of `tokens` tokens
    waiting for backward. Each micro-batch also keeps the stage's output, 2·h bytes per token (the
    pipeline's output buffer, or the final norm's input on the last stage). With activation
    checkpointing a block keeps only its input (2·s·b·h) and one block's full activations exist at a
    time, during its recomputation."""
    full = layer_activation_bytes_per_token(args, tp) * tokens
    block_input = BF16 * args.hidden_size * tokens
    stage_output = BF16 * args.hidden_size * tokens
    if checkpointing:
        return int(in_flight * (layers * block_input + stage_output) + full)
    return int(in_flight * (layers * full + stage_output))


def loss_chunk_bytes(args: ModelArgs, tp: int, tokens: int, chunk_tokens: int) -> int:
    """One chunk of fp32 logits on this rank's vocabulary slice and its gradient (softmax − onehot)."""
    return min(chunk_tokens, tokens) * padded_vocab_size(args.vocab_size, tp) // tp * FP32 * 2


def head_gradient_bytes(args: ModelArgs, tp: int, tokens: int) -> int:
    """What the chunked loss keeps from forward to backward: d loss/d hidden (bf16, s·b·h) and the head's
    weight gradient, accumulated in fp32 and saved as a bf16 copy (both alive at the end of forward)."""
    head = padded_vocab_size(args.vocab_size, tp) // tp * args.hidden_size
    return BF16 * args.hidden_size * tokens + (FP32 + BF16) * head


# ---- the plan ------------------------------------------------------------------------------------


@dataclass
class Component:
    name: str
    bytes: int
    how: str
    kind: str  # "model states", "activations" or "LM-head loss buffers"


@dataclass
class StagePlan:
    stage: int
    specs: str  # e.g. "embedding + layers 0-18"
    parameters: int  # held by one rank of this stage
    in_flight: int  # micro-batches whose activations are alive at once
    components: list[Component]

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.components:
            out[c.kind] = out.get(c.kind, 0) + c.bytes
        return out


@dataclass
class Plan:
    arch: str
    args: ModelArgs
    nodes: int
    gpus_per_node: int
    tensor: int
    pipeline: int
    data: int
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    micro_batch: int
    seq_len: int
    grad_accumulation: int
    global_batch: int
    checkpointing: bool
    gpu_memory_gib: float
    stages: list[StagePlan]
    cpu_per_node: int
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> int:
        return self.worst.total

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    @property
    def verdict(self) -> str:
        used, cap = self.total_gib, self.gpu_memory_gib
        share = f"{used:.1f} of {cap:g} GiB ({100 * used / cap:.0f}%)"
        if used <= FIT_FRACTION * cap:
            return (f"fits: {share}, leaving {cap - used:.1f} GiB for the CUDA context, NCCL, DeepSpeed buckets "
                    "and fragmentation")
        fix = ("set model.activation_checkpointing=true" if not self.checkpointing
               else "lower train.micro_batch" if self.micro_batch > 1
               else "set parallel.offload_optimizer=true" if self.zero_stage == 3 and not self.offload_optimizer
               else "use more GPUs or a larger parallel.tensor / parallel.pipeline")
        if used <= cap:
            return f"tight: {share}, under {100 * (1 - FIT_FRACTION):.0f}% left for what the plan does not model; {fix}"
        return f"does not fit: {share}; {fix}"

    def to_dict(self) -> dict:
        worst = self.worst
        return {
            "arch": self.arch, "parameters": self.args.num_parameters(), "vocab_size": self.args.vocab_size,
            "layout": {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "tensor": self.tensor,
                       "pipeline": self.pipeline, "data": self.data, "zero_stage": self.zero_stage,
                       "offload_optimizer": self.offload_optimizer, "offload_params": self.offload_params},
            "batch": {"micro_batch": self.micro_batch, "seq_len": self.seq_len,
                      "grad_accumulation": self.grad_accumulation, "global_batch": self.global_batch,
                      "global_batch_tokens": self.global_batch * self.seq_len,
                      "activation_checkpointing": self.checkpointing},
            "worst_stage": worst.stage,
            "components": [{"name": c.name, "kind": c.kind, "bytes": c.bytes, "gib": c.bytes / GIB, "how": c.how}
                           for c in worst.components],
            "by_kind_bytes": worst.by_kind(),
            "total_bytes": self.total, "total_gib": self.total_gib,
            "gpu_memory_gib": self.gpu_memory_gib, "verdict": self.verdict,
            "stages": [{"stage": s.stage, "specs": s.specs, "parameters": s.parameters, "in_flight": s.in_flight,
                        "total_bytes": s.total, "total_gib": s.total / GIB} for s in self.stages],
            "cpu_per_node_bytes": self.cpu_per_node, "notes": self.notes,
        }


def _describe(names: list[str]) -> str:
    layers = [int(n.split()[1]) for n in names if n.startswith("layer ")]
    parts = [n for n in names if n == "embedding"]
    if layers:
        parts.append(f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}")
    parts += [n for n in names if n in ("norm", "head")]
    return " + ".join(parts) or "(nothing)"


def _zero_how(zero: int, dp: int, offload_optimizer: bool, offload_params: bool) -> dict[str, str]:
    if zero == 3:
        if offload_optimizer and offload_params:
            return dict(parameters="offloaded to CPU", gradients="offloaded to CPU", optimizer="offloaded to CPU")
        if offload_optimizer:
            return dict(parameters=f"2 B/param / DP {dp}", gradients="offloaded to CPU", optimizer="offloaded to CPU")
        return dict(parameters=f"2 B/param / DP {dp}", gradients=f"2 B/param / DP {dp}",
                    optimizer=f"14 B/param / DP {dp}: fp32 master, m, v + fp32 grad buffers")
    if zero == 2:
        if offload_optimizer:
            return dict(parameters="2 B/param, replicated", gradients="offloaded to CPU", optimizer="offloaded to CPU")
        return dict(parameters="2 B/param, replicated", gradients=f"bf16 + fp32: 6 B/param / DP {dp}",
                    optimizer=f"fp32 master, m, v: 12 B/param / DP {dp}")
    if zero == 1:
        return dict(parameters="2 B/param, replicated", gradients="2 B/param, replicated",
                    optimizer="offloaded to CPU" if offload_optimizer
                    else f"fp32 grads, master, m, v: 16 B/param / DP {dp}")
    return dict(parameters="2 B/param", gradients="2 B/param", optimizer="fp32 grads, master, m, v: 16 B/param")


def plan(cfg: Config, args: ModelArgs, nodes: int, gpus_per_node: int, gpu_memory_gib: float = 80.0,
         arch: str = "", notes: list[str] | None = None) -> Plan:
    """The memory plan of `cfg` with architecture `args` on nodes × gpus_per_node GPUs."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must both be at least 1")
    world = nodes * gpus_per_node
    validate(cfg, world_size=world)
    validate_model_layout(cfg, args.num_heads, args.num_kv_heads, args.num_layers)
    p, t = cfg.parallel, cfg.train
    tp, pp = p.tensor, p.pipeline
    dp = world // (tp * pp)
    gas = t.global_batch // (t.micro_batch * dp)
    tokens = t.micro_batch * t.seq_len
    notes = list(notes or [])
    if cfg.model.dtype == "fp32":
        notes.append("model.dtype=fp32: the plan assumes bf16 training (fp32 needs about twice the activations)")
    if p.offload_params and not p.offload_optimizer:
        notes.append("parallel.offload_params without parallel.offload_optimizer: planned as DeepSpeed's "
                     "estimator does, with no GPU saving")

    specs = spec_parameters(args, tp)
    counts = [n for _, n in specs]
    if pp == 1 and args.tie_word_embeddings:  # one model: the tied head is the embedding itself
        specs, counts = specs[:-1], counts[:-1]
    bounds = stage_boundaries(counts, pp, p.pipeline_partition) if pp > 1 else [0, len(counts)]
    largest = largest_layer_parameters(args, tp)
    how = _zero_how(p.zero_stage, dp, p.offload_optimizer, p.offload_params)
    ckpt = cfg.model.activation_checkpointing
    vocab_rows = padded_vocab_size(args.vocab_size, tp) // tp
    chunk = min(cfg.model.loss_chunk_tokens, tokens)

    stages = []
    for stage in range(pp):
        names = [n for n, _ in specs[bounds[stage]:bounds[stage + 1]]]
        params = sum(counts[bounds[stage]:bounds[stage + 1]])
        layers = sum(n.startswith("layer ") for n in names)
        in_flight = min(pp - stage, gas)  # 1F1B: stage k has at most PP − k forwards waiting
        states = model_states(params, p.zero_stage, dp, largest, p.offload_optimizer, p.offload_params)
        rows = [
            Component("parameters (bf16)", states["parameters"], how["parameters"], STATES),
            Component("gradients", states["gradients"], how["gradients"], STATES),
            Component("optimizer states", states["optimizer"], how["optimizer"], STATES),
        ]
        if p.zero_stage == 3:
            rows.append(Component("ZeRO-3 gathered layer", states["gathered"],
                                  f"4 B × largest layer {largest / 1e6:,.0f} M params", STATES))
        act_how = f"{in_flight} micro-batch{'es' if in_flight > 1 else ''} × {tokens:,} tokens: " + \
            (f"{layers} block inputs + 1 recomputed block" if ckpt else f"{layers} blocks") + " + stage output"
        rows.append(Component("activations" + (" (checkpointed)" if ckpt else ""),
                              activation_bytes(args, tp, tokens, layers, in_flight, ckpt), act_how, ACTIVATIONS))
        if stage == pp - 1:  # the loss runs where the head is
            rows.append(Component("LM-head loss chunk", loss_chunk_bytes(args, tp, tokens, chunk),
                                  f"{chunk:,} tokens × {vocab_rows:,} vocab rows × 4 B × 2", LOSS))
            rows.append(Component("LM-head gradients held by the loss", head_gradient_bytes(args, tp, tokens),
                                  "fp32 + bf16 head grad, bf16 d/d hidden", LOSS))
        if distilled_sources(cfg):  # validation keeps TP = PP = 1
            rows.append(Component("distillation teacher (the frozen start)", params * BF16,
                                  f"bf16 copy of all {params / 1e6:,.0f} M parameters on every rank (distill: true)",
                                  STATES))
            rows.append(Component("KL: fp32 copies of both heads", 2 * vocab_rows * args.hidden_size * 4,
                                  f"2 × {vocab_rows:,} vocab rows × {args.hidden_size:,} × 4 B", LOSS))
            rows.append(Component("KL: logits chunk", chunk * vocab_rows * 4 * 3,
                                  f"{chunk:,} tokens × {vocab_rows:,} vocab rows × 4 B × 3 (both log-softmaxes, "
                                  "probabilities)", LOSS))
            rows.append(Component("LM-head gradients held by the KL", head_gradient_bytes(args, tp, tokens),
                                  "as the cross-entropy's: fp32 + bf16 head grad, bf16 d/d hidden", LOSS))
        stages.append(StagePlan(stage, _describe(names), params, in_flight, rows))

    worst = max(stages, key=lambda s: s.total)
    cpu = gpus_per_node * offloaded_cpu_bytes_per_rank(worst.parameters, p.zero_stage, dp,
                                                       p.offload_optimizer, p.offload_params)
    return Plan(arch=arch or cfg.model.init_from, args=args, nodes=nodes, gpus_per_node=gpus_per_node,
                tensor=tp, pipeline=pp, data=dp, zero_stage=p.zero_stage, offload_optimizer=p.offload_optimizer,
                offload_params=p.offload_params, micro_batch=t.micro_batch, seq_len=t.seq_len,
                grad_accumulation=gas, global_batch=t.global_batch, checkpointing=ckpt,
                gpu_memory_gib=gpu_memory_gib, stages=stages, cpu_per_node=cpu, notes=notes)


def resolve_model_args(cfg: Config, arch: str | None = None, vocab_size: int | None = None
                       ) -> tuple[ModelArgs, str, list[str]]:
    """(architecture, its name, notes): read from model.init_from when it is here (HF directory, .gguf or
    preset), else from the `arch` preset; the vocabulary grown to `vocab_size` or to tokenizer.path's."""
    init = cfg.model.init_from
    notes = []
    if init in PRESETS or Path(init).expanduser().exists():
        from megakor.checkpoint.source import resolve_model_source

        args, name = resolve_model_source(init).args(), init
        if arch:
            notes.append(f"--arch {arch} ignored: model.init_from={init} exists here and was read instead")
    elif arch is None:
        raise ConfigError(f"model.init_from={init} is not on this machine; pass --arch PRESET "
                          f"({', '.join(PRESETS)}) to plan with that preset's architecture")
    elif arch not in PRESETS:
        raise ConfigError(f"--arch {arch} is not a preset; use one of {', '.join(PRESETS)}")
    else:
        args, name = preset(arch), arch
    if vocab_size is not None:
        if vocab_size < 1:
            raise ConfigError(f"--vocab-size={vocab_size} must be at least 1")
        args = dataclasses.replace(args, vocab_size=vocab_size)
    elif cfg.tokenizer.path:
        if Path(cfg.tokenizer.path).exists():
            from megakor.train.engine import vocab_of

            args = dataclasses.replace(args, vocab_size=max(args.vocab_size, vocab_of(cfg.tokenizer.path)))
        else:
            notes.append(f"tokenizer.path={cfg.tokenizer.path} is not on this machine: planned with the model's "
                         f"vocabulary of {args.vocab_size:,}; pass --vocab-size for an extended one")
    return args, name, notes


def format_plan(pl: Plan) -> str:
    """The table launch/plan.py prints."""
    a = pl.args
    zero = f"ZeRO-{pl.zero_stage}"
    if pl.offload_optimizer or pl.offload_params:
        zero += " + CPU offload of " + " and ".join(
            w for w, on in (("optimizer", pl.offload_optimizer), ("params", pl.offload_params)) if on)
    tokens = pl.global_batch * pl.seq_len
    lines = [
        f"model    {pl.arch}: {a.num_parameters() / 1e9:.2f} B parameters, {a.num_layers} layers, "
        f"hidden {a.hidden_size}, heads {a.num_heads}/{a.num_kv_heads}, vocab {a.vocab_size:,}",
        f"layout   {pl.nodes} node{'s' if pl.nodes > 1 else ''} × {pl.gpus_per_node} GPUs: "
        f"TP {pl.tensor} × PP {pl.pipeline} × DP {pl.data}, {zero}",
        f"batch    micro {pl.micro_batch} × seq {pl.seq_len:,} × grad accumulation {pl.grad_accumulation} × DP "
        f"{pl.data} = global {pl.global_batch} sequences ({tokens / 1e6:.2f} M tokens), activation checkpointing "
        f"{'on' if pl.checkpointing else 'off'}",
    ]
    if pl.pipeline > 1:
        for s in pl.stages:
            lines.append(f"stage {s.stage:<2} {s.specs}: {s.parameters / 1e9:.2f} B params/rank, "
                         f"{s.in_flight} in flight, {s.total / GIB:.2f} GiB")
    w = pl.worst
    lines.append("")
    lines.append(f"memory per GPU{f' (stage {w.stage}, the largest)' if pl.pipeline > 1 else ''}, "
                 f"{w.parameters / 1e9:.2f} B params on this rank")
    width = max(len(c.name) for c in w.components) + 2
    lines.append(f"{'component':<{width}}{'GiB':>8}  how")
    lines += [f"{c.name:<{width}}{c.bytes / GIB:>8.2f}  {c.how}" for c in w.components]
    lines.append(f"{'total':<{width}}{pl.total_gib:>8.2f}  = "
                 + " + ".join(f"{kind} {b / GIB:.2f}" for kind, b in w.by_kind().items()))
    if pl.cpu_per_node:
        lines.append(f"CPU memory per node for offloaded states: {pl.cpu_per_node / GIB:.1f} GiB "
                     "(DeepSpeed's 1.5× buffer factor)")
    lines.append(f"verdict: {pl.verdict}")
    lines += [f"note: {n}" for n in pl.notes]
    return "\n".join(lines)
