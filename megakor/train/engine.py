"""The DeepSpeed engine for the DP × TP (ZeRO) mode: its JSON from our config, the model built
partitioned, HF weights streamed in one parameter at a time, and the AdamW parameter groups.

DeepSpeed JSON: every field that follows from our config (batch sizes, ZeRO stage, offload, dtype,
clipping, AdamW hyper-parameters) is generated here. `deepspeed.config=FILE` may add any other field
(bucket sizes, prefetching, comms logging, ...); a field the file sets to a value different from the
generated one is an error naming both values, because silently preferring either hides a mistake.

Model construction under ZeRO-3: `deepspeed.zero.Init` partitions each parameter over the
data-parallel group the moment it is created, so no rank ever holds the model. Weights then come in
parameter by parameter: `GatheredParameters(p, modifier_rank=0)` materialises one parameter (this TP
rank's slice), data-parallel rank 0 fills it from the checkpoint, and leaving the context broadcasts
and re-partitions it. Only data-parallel rank 0 of each TP rank reads the checkpoint: its TP slices
(safetensors lazy slicing), one layer at a time.

Tensor-parallel parameters carry `tensor_model_parallel = True`, the attribute DeepSpeed's
`is_model_parallel_parameter` checks: ZeRO-3's global gradient norm sums TP-split parameters over the
model-parallel (TP) group and counts replicated ones (norms, row-parallel biases) on TP rank 0 only,
so they are not counted TP times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import json
import re
import zlib
from pathlib import Path

import torch

from megakor.checkpoint.hf import HFCheckpoint, key_map, layer_index, load_state_dict, tp_split_kind
from megakor.checkpoint.source import resolve_model_source
from megakor.config import Config, ConfigError, distilled_sources, layer_range
from megakor.model.args import PRESETS, ModelArgs, to_hf_config
from megakor.model.attention import rope_inv_freq
from megakor.model.llama import Llama

# ---- dtype and model shape (both known before any process group) --------------------------------


def train_dtype(cfg: Config, device_type: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU, unless model.dtype says otherwise."""
    if cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def model_args(init_from: str) -> ModelArgs:
    """The architecture of `model.init_from`, read without weights (`megakor.checkpoint.source`)."""
    return resolve_model_source(init_from).args()


# ---- the DeepSpeed JSON --------------------------------------------------------------------------


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def optimizer_params(cfg: Config, device_type: str) -> dict:
    """How AdamW runs. optim.implementation=torch (the default): torch.optim.AdamW through DeepSpeed's
    `torch_adam` path, fused (one multi-tensor CUDA kernel) on GPU, so nothing is compiled at start-up;
    with offloaded optimizer states it runs on the CPU copies. optim.implementation=deepspeed:
    DeepSpeed's FusedAdam (GPU) or CPUAdam (offload), C++/CUDA extensions it JIT-builds with nvcc on
    first use (see `prepare_deepspeed_ops`)."""
    if cfg.optim.implementation == "deepspeed" and device_type == "cuda":
        return {}
    params: dict = {"torch_adam": True}
    if device_type == "cuda" and not cfg.parallel.offload_optimizer:
        params["fused"] = True
    return params


def zero_settings(cfg: Config, device_type: str, hidden_size: int | None, dp: int) -> dict:
    """ZeRO bucket, prefetch and persistence sizes for GPUs, from the hidden size h (the rules the HF
    integration's "auto" values use): reduce bucket h², ZeRO-3 prefetch bucket 0.9·h², parameters
    under 10·h elements (norms, biases) kept whole instead of gathered per use; communication overlapped
    with compute, gradients copied into one contiguous buffer. With one data-parallel rank a ZeRO-3
    partition is the whole parameter, so every parameter is kept whole (unless parameters are offloaded
    to the CPU): gathering it before each use would cost host time and copies and save no memory. DeepSpeed's defaults stay on CPU. Any of them
    can be overridden from deepspeed.config."""
    if device_type != "cuda" or hidden_size is None:
        return {}
    h = hidden_size
    out = {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": h * h}
    if cfg.parallel.zero_stage == 3:
        # Offloaded parameters must stay partitioned (persistent ones would sit on the GPU).
        persist = 10 * h if dp > 1 or cfg.parallel.offload_params else 2**62
        out.update(stage3_prefetch_bucket_size=int(0.9 * h * h), stage3_param_persistence_threshold=persist)
    return out


def sanitized_cuda_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST without the architecture-specific suffixes NVIDIA's images use ("9.0a",
    "10.0a+PTX" → "9.0", "10.0+PTX"): DeepSpeed's op builder parses each part as an integer and fails
    on them (DeepSpeed issue #7589)."""
    return re.sub(r"(\d+\.\d+)[a-zA-Z]+", r"\1", value)


def prepare_deepspeed_ops(cfg: Config, device_type: str) -> None:
    """Before DeepSpeed may JIT-build its Adam (optim.implementation=deepspeed on GPU): nvcc must exist
    unless the op was prebuilt, and TORCH_CUDA_ARCH_LIST must be in a form its builder parses."""
    import os
    import shutil

    if cfg.optim.implementation != "deepspeed" or device_type != "cuda":
        return
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = sanitized_cuda_arch_list(arch)
    op = "cpu_adam" if cfg.parallel.offload_optimizer else "fused_adam"
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if not installed_ops.get(op) and not shutil.which("nvcc") and not Path(cuda_home, "bin", "nvcc").is_file():
        raise ConfigError(f"optim.implementation=deepspeed makes DeepSpeed build its {op} op with nvcc, which this "
                          "machine lacks; set optim.implementation=torch (fused torch AdamW, nothing to build) or "
                          "install the CUDA toolkit")


def deepspeed_config(cfg: Config, dp: int, device_type: str, hidden_size: int | None = None) -> dict:
    """The DeepSpeed JSON for this run and data-parallel size, with `deepspeed.config` merged in.
    `hidden_size` sizes the ZeRO buckets on GPUs (`zero_settings`)."""
    t, p, o = cfg.train, cfg.parallel, cfg.optim
    gas = t.global_batch // (t.micro_batch * dp)
    bf16 = train_dtype(cfg, device_type) == torch.bfloat16
    # Fields derived from our config, with the config key that decides each (named in conflicts).
    derived = {
        "train_batch_size": (t.global_batch, f"train.global_batch={t.global_batch}"),
        "train_micro_batch_size_per_gpu": (t.micro_batch, f"train.micro_batch={t.micro_batch}"),
        "gradient_accumulation_steps": (gas, f"train.global_batch / (train.micro_batch × data-parallel size {dp}) = {gas}"),
        "gradient_clipping": (t.grad_clip, f"train.grad_clip={t.grad_clip}"),
        "zero_optimization.stage": (p.zero_stage, f"parallel.zero_stage={p.zero_stage}"),
        "bf16.enabled": (bf16, f"model.dtype={cfg.model.dtype} on {device_type}"),
        "fp16.enabled": (False, "megakor, which trains in bf16 or fp32 (no loss scaling)"),
        "optimizer.type": ("AdamW", "megakor, which trains with AdamW"),
        "optimizer.params.lr": (o.lr, f"optim.lr={o.lr}"),
        "optimizer.params.betas": (list(o.betas), f"optim.betas={list(o.betas)}"),
        "optimizer.params.eps": (o.eps, f"optim.eps={o.eps}"),
        "optimizer.params.weight_decay": (o.weight_decay, f"optim.weight_decay={o.weight_decay}"),
    }
    if p.offload_optimizer:
        derived["zero_optimization.offload_optimizer.device"] = ("cpu", "parallel.offload_optimizer=true")
    if p.offload_params:
        derived["zero_optimization.offload_param.device"] = ("cpu", "parallel.offload_params=true")
    ds: dict = {
        "steps_per_print": 2**31 - 1,  # megakor logs; DeepSpeed's own step lines would duplicate them
        "wall_clock_breakdown": False,
        "optimizer": {"params": optimizer_params(cfg, device_type)},
        "zero_optimization": zero_settings(cfg, device_type, hidden_size, dp),
    }
    if p.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"pin_memory": device_type == "cuda"}
    if p.offload_params:
        ds["zero_optimization"]["offload_param"] = {"pin_memory": device_type == "cuda"}
    for key, (value, _) in derived.items():
        _set(ds, key, value)
    if cfg.deepspeed.config:
        path = Path(cfg.deepspeed.config)
        if not path.is_file():
            raise ConfigError(f"deepspeed.config={path} does not exist; pass an existing DeepSpeed JSON file "
                              "or leave it unset")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"deepspeed.config={path} is not valid JSON ({e.msg} at line {e.lineno}); "
                              "fix the file") from None
        if not isinstance(user, dict):
            raise ConfigError(f"deepspeed.config={path} must hold a JSON object of DeepSpeed fields")
        if "scheduler" in user:
            raise ConfigError(f"deepspeed.config={path} defines a scheduler; megakor sets the learning rate from "
                              "optim.schedule, so remove 'scheduler' from the file")
        for key in derived:  # a section the file replaces by a scalar would drop our fields
            section = key.split(".")[0]
            if section in user and not isinstance(user[section], dict) and "." in key:
                raise ConfigError(f"deepspeed.config={path} sets '{section}' to {user[section]!r}; it must be an object")
        for key, value in _leaves(user):
            if key in derived and value != "auto" and value != derived[key][0]:
                ours, source = derived[key]
                raise ConfigError(f"deepspeed.config={path} sets {key}={value!r} but {source} gives {ours!r}; "
                                  f"remove {key} from the file or change the megakor setting")
            if key not in derived:
                _set(ds, key, value)
    return ds


# ---- weights ------------------------------------------------------------------------------------


class RandomInit(HFCheckpoint):
    """A preset's random initialisation served as if it were an HF checkpoint: each tensor is drawn
    whole from a generator seeded by (seed, tensor name) and then sliced, so every TP layout starts
    from the same weights. Matrices N(0, initializer_range), norms one, biases zero."""

    def __init__(self, args: ModelArgs, seed: int):
        self.path, self.args, self.seed = None, args, seed
        self.hf_config = to_hf_config(args)
        self._memory, self._open = None, {}
        self._shapes = self._hf_shapes(args)
        self._files = {k: "<random>" for k in self._shapes}

    @staticmethod
    def _hf_shapes(args: ModelArgs) -> dict[str, list[int]]:
        d, hd, f = args.hidden_size, args.head_dim, args.intermediate_size
        by_suffix = {
            "tok_embeddings.weight": [args.vocab_size, d], "lm_head.weight": [args.vocab_size, d], "norm.weight": [d],
            "q_proj.weight": [args.num_heads * hd, d], "k_proj.weight": [args.num_kv_heads * hd, d],
            "v_proj.weight": [args.num_kv_heads * hd, d], "o_proj.weight": [d, args.num_heads * hd],
            "q_proj.bias": [args.num_heads * hd], "k_proj.bias": [args.num_kv_heads * hd],
            "v_proj.bias": [args.num_kv_heads * hd], "o_proj.bias": [d],
            "gate_proj.weight": [f, d], "up_proj.weight": [f, d], "down_proj.weight": [d, f],
            "gate_proj.bias": [f], "up_proj.bias": [f], "down_proj.bias": [d],
        }
        out = {}
        for hf, mk in key_map(args).items():
            out[hf] = next(shape for suffix, shape in by_suffix.items() if mk.endswith(suffix))
        return out

    def shape(self, key: str) -> list[int]:
        return list(self._shapes[key])

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        shape = self._shapes[key]
        if key.endswith("norm.weight"):
            t = torch.ones(shape)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
            t = torch.randn(shape, generator=g) * self.args.initializer_range
        if dim is None:
            return t
        return t.narrow(dim, start, (stop if stop is not None else shape[dim]) - start).clone()


def open_weights(init_from: str, seed: int, tokenizer_path: str | None = None, init_method: str = "subword"):
    """The weight source of `model.init_from`: an HFCheckpoint (directory or GGUF) or a RandomInit;
    grown to `tokenizer_path`'s vocabulary (new rows by `init_method`) when that tokenizer extends it."""
    resolved = resolve_model_source(init_from)
    if resolved.kind == "preset":
        return RandomInit(resolved.args(), seed)
    source = resolved.open()
    if grows_vocabulary(init_from, tokenizer_path):
        from megakor.checkpoint.resize import ResizedCheckpoint

        source = ResizedCheckpoint(source, resolved.tokenizer_dir(), tokenizer_path, init_method, seed)
    return source


def vocab_of(tokenizer_path) -> int:
    from megakor.tokenizer import load_tokenizer

    return len(load_tokenizer(tokenizer_path))


def _own_tokenizer(init_from: str) -> Path | None:
    return resolve_model_source(init_from).tokenizer_dir()


def grows_vocabulary(init_from: str, tokenizer_path: str | None) -> bool:
    """Whether `tokenizer_path` extends the checkpoint's own tokenizer, so rows must be added at start-up.
    Compared with the checkpoint's tokenizer, not its row count: Qwen2-style checkpoints carry spare
    rows, which new tokens must take over with a proper initialisation."""
    if not tokenizer_path or init_from in PRESETS:
        return False
    own = _own_tokenizer(init_from)
    if own is not None:
        return vocab_of(tokenizer_path) > vocab_of(own)
    return vocab_of(tokenizer_path) > model_args(init_from).vocab_size


def resolved_model_args(cfg: Config) -> ModelArgs:
    """`model_args` with the vocabulary grown to `tokenizer.path` when that tokenizer extends the
    checkpoint's (a vocabulary-extended tokenizer on a base checkpoint: the rows are added at start-up)."""
    args = model_args(cfg.model.init_from)
    if grows_vocabulary(cfg.model.init_from, cfg.tokenizer.path):
        if _own_tokenizer(cfg.model.init_from) is None:
            raise ConfigError(
                f"tokenizer.path={cfg.tokenizer.path} extends model.init_from's vocabulary; growing it at start-up "
                "needs a checkpoint with its own tokenizer (convert a .gguf with launch/convert.py first)")
        args = dataclasses.replace(args, vocab_size=max(args.vocab_size, vocab_of(cfg.tokenizer.path)))
    return args


def first_trainable_row(cfg: Config) -> int | None:
    """For train.freeze=new_embeddings_only, the first row that trains: the base vocabulary size, from
    the extended tokenizer's megakor_extension.json or, when rows are grown at start-up, the size of the
    checkpoint's own tokenizer. None when nothing is frozen."""
    if cfg.train.freeze == "none":
        return None
    from megakor.checkpoint.resize import base_vocab_size

    tok_dir = cfg.tokenizer.path or _own_tokenizer(cfg.model.init_from)
    base = base_vocab_size(tok_dir)
    if base is None and grows_vocabulary(cfg.model.init_from, cfg.tokenizer.path):
        base = vocab_of(_own_tokenizer(cfg.model.init_from))
    if base is None:
        raise ConfigError(
            "train.freeze=new_embeddings_only needs to know which vocabulary rows are new; extend the tokenizer "
            "with launch/extend_tokenizer.py (it writes megakor_extension.json) and pass it as tokenizer.path")
    return base


def mark_tensor_parallel(model: torch.nn.Module) -> None:
    """Tag TP-split parameters for DeepSpeed's gradient norm (see the module docstring)."""
    for name, p in model.named_parameters():
        p.tensor_model_parallel = tp_split_kind(name) is not None


def load_weights(model: Llama, init_from: str, seed: int, tp_rank: int, tp_size: int, dp_rank: int, zero3: bool,
                 tokenizer_path: str | None = None, init_method: str = "subword",
                 params: dict[str, torch.nn.Parameter] | None = None) -> None:
    """Fill `model` from `model.init_from`, one layer's slices read at a time.

    Under ZeRO-3 only data-parallel rank 0 reads; the others take part in each parameter's gather and
    receive the broadcast. Without ZeRO-3 every rank fills its own (TP-sliced) parameters. `params`
    (megakor name → parameter) defaults to the model's; a pipeline stage passes only its own."""
    import deepspeed

    reader = dp_rank == 0 or not zero3
    if reader:
        from megakor.train import faults

        faults.fail_loading_weights()
    source = open_weights(init_from, seed, tokenizer_path, init_method) if reader else None
    params = dict(model.named_parameters()) if params is None else params
    groups: dict[int | None, list[str]] = {}
    for name in params:  # model order, identical on every rank (gathers are collective)
        groups.setdefault(layer_index(name), []).append(name)
    for layer, names in groups.items():
        tensors = {}
        if reader:
            tensors = load_state_dict(source, tp_rank, tp_size, layers=[] if layer is None else [layer],
                                      include_embedding=layer is None and "tok_embeddings.weight" in names,
                                      include_norm=layer is None and "norm.weight" in names,
                                      include_head=layer is None and "lm_head.weight" in names)
            if sorted(tensors) != sorted(names):
                differ = sorted(set(tensors) ^ set(names))[:3]
                raise ValueError(f"checkpoint {init_from} and the model disagree on {differ}; "
                                 "check that model.init_from matches the model configuration")
        for name in names:
            p = params[name]
            ctx = deepspeed.zero.GatheredParameters([p], modifier_rank=0) if zero3 else contextlib.nullcontext()
            with ctx, torch.no_grad():
                if reader:
                    if tuple(p.shape) != tuple(tensors[name].shape):
                        raise ValueError(f"{name}: checkpoint slice {tuple(tensors[name].shape)} does not fit "
                                         f"parameter {tuple(p.shape)}")
                    p.copy_(tensors[name])


def build_model(cfg: Config, ps, ds_config: dict, dtype: torch.dtype, device: torch.device) -> Llama:
    """The model for this rank: built partitioned under ZeRO-3, weights from `model.init_from`."""
    import deepspeed

    args = resolved_model_args(cfg)
    zero3 = cfg.parallel.zero_stage == 3
    # dtype comes from the JSON's bf16 flag: zero.Init's own `dtype` argument is ignored on accelerators
    # without fp16 (DeepSpeed 0.19 picks bf16 on CPU whatever is passed).
    ctx = deepspeed.zero.Init(data_parallel_group=ps.dp_group, config_dict_or_path=ds_config,
                              mpu=ps) if zero3 else contextlib.nullcontext()
    with ctx:
        model = Llama(args, ps.tp_group_or_none(), cfg.model.attention, cfg.model.loss_chunk_tokens,
                      cfg.model.activation_checkpointing)
    if not zero3:
        model = model.to(device=device, dtype=dtype)
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"parameters were built in {sorted(map(str, wrong))} instead of {dtype}; "
                           "the DeepSpeed version changed how zero.Init picks the dtype")
    mark_tensor_parallel(model)
    load_weights(model, cfg.model.init_from, cfg.train.seed, ps.tp_rank, ps.tp, ps.dp_rank, zero3,
                 cfg.tokenizer.path, cfg.tokenizer.new_embedding_init)
    first_row = first_trainable_row(cfg)
    if first_row is not None:
        # Stage 1: only the new rows of the embedding (and head) train; everything else is frozen.
        model.train_only_vocab_rows_from(first_row)
        for name, p in model.named_parameters():
            p.requires_grad_(name in ("tok_embeddings.weight", "lm_head.weight"))
    frozen = tuple(f"layers.{i}." for i in layer_range(cfg.train.frozen_layers, args.num_layers))
    for name, p in model.named_parameters():
        if name.startswith(frozen):  # partial freezing: these layers keep their loaded weights
            p.requires_grad_(False)
    if zero3:
        # The LM head (or the tied embedding) is used in the loss, outside its own module's forward:
        # register it with the top module so ZeRO-3 gathers it for the whole forward and backward.
        deepspeed.zero.register_external_parameter(model, model.head_weight)
    return model


def build_teacher(cfg: Config, ps, dtype: torch.dtype, device: torch.device) -> Llama | None:
    """The starting model (`model.init_from`, read as the trained model reads it), frozen, when some source
    has `distill: true`; else None. It is a plain module, not DeepSpeed's: a full copy on every rank in
    the training dtype (config validation keeps parallel.tensor and parallel.pipeline at 1), allocated
    directly in that dtype on the device."""
    if not distilled_sources(cfg):
        return None
    args = resolved_model_args(cfg)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            teacher = Llama(args, None, cfg.model.attention, cfg.model.loss_chunk_tokens, False)
        teacher = teacher.to_empty(device=device)
    finally:
        torch.set_default_dtype(default)
    teacher.rope.inv_freq = rope_inv_freq(args).to(device)
    load_weights(teacher, cfg.model.init_from, cfg.train.seed, 0, 1, ps.dp_rank, False, cfg.tokenizer.path,
                 cfg.tokenizer.new_embedding_init)
    return teacher.requires_grad_(False).eval()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: weight decay on matrices and embeddings, none on norms
    and biases (1-D). With frozen vocabulary rows nothing decays: decay would move the old rows."""
    if getattr(getattr(model, "tok_embeddings", None), "first_trainable_row", None) is not None:
        weight_decay = 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Under ZeRO-3 p.ndim is the partitioned placeholder's; ds_shape keeps the real shape.
    decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) >= 2]
    no_decay = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def build_engine(cfg: Config, ps, device: torch.device):
    """(DeepSpeed engine, resolved DeepSpeed JSON, training dtype)."""
    import deepspeed

    if ps.pp > 1:
        return build_pipeline_engine(cfg, ps, device)
    dtype = train_dtype(cfg, device.type)
    prepare_deepspeed_ops(cfg, device.type)
    ds_config = deepspeed_config(cfg, ps.dp, device.type, resolved_model_args(cfg).hidden_size)
    model = build_model(cfg, ps, copy.deepcopy(ds_config), dtype, device)
    if cfg.parallel.zero3_leaf_modules and cfg.parallel.zero_stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from megakor.model.llama import Block

        # Gather each decoder block's parameters at once (one hook per block, not one per linear layer).
        set_z3_leaf_modules(model, [Block])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                           config=copy.deepcopy(ds_config), mpu=ps)
    # RoPE frequencies in fp32 on the device, whatever zero.Init or DeepSpeed's module cast did to buffers.
    engine.module.rope.inv_freq = rope_inv_freq(model.args).to(device)
    return engine, ds_config, dtype


# ---- the pipeline mode (PP × DP × TP, ZeRO 0/1) ----------------------------------------------------


def mark_for_pipeline_grad_norm(model, tp_rank: int) -> None:
    """Make DeepSpeed count each gradient exactly once in the global norm it clips with.

    ZeRO-1 and the bf16 optimizer count a parameter when it is TP-split or on TP rank 0, skipping the
    last stage's copy of a tied embedding (`ds_pipe_replicated`). ZeRO-0 in fp32 clips through
    `clip_grad_norm_` instead, which skips nothing and keys "replicated" on the rank in DeepSpeed's
    model-parallel group, TP × PP: it would count the norms of stage 0 only, and the tied embedding
    twice. Marking `model_parallel` on exactly the parameters that should count makes both agree."""
    from megakor.model.pipeline import megakor_name

    for name, p in model.named_parameters():
        replicated = getattr(p, "ds_pipe_replicated", False)
        split = tp_split_kind(megakor_name(name)) is not None
        p.tensor_model_parallel = split and not replicated
        p.model_parallel = not replicated and (split or tp_rank == 0)


def build_pipeline_engine(cfg: Config, ps, device: torch.device):
    """The pipeline engine: this rank's stage of `LlamaPipe` on a DeepSpeed topology equal to ours
    (checked), weights read for the stage's own layers and TP slice, AdamW over the stage."""
    import deepspeed

    from megakor.model.attention import RotaryEmbedding
    from megakor.model.pipeline import LlamaPipe
    from megakor.parallel import check_deepspeed_grid, deepspeed_topology

    dtype = train_dtype(cfg, device.type)
    prepare_deepspeed_ops(cfg, device.type)
    args = resolved_model_args(cfg)
    ds_config = deepspeed_config(cfg, ps.dp, device.type, args.hidden_size)
    model = LlamaPipe(args, deepspeed_topology(ps.topology), ps.tp_group_or_none(), cfg.model.attention,
                      cfg.model.loss_chunk_tokens, cfg.model.activation_checkpointing, cfg.parallel.pipeline_partition)
    check_deepspeed_grid(model.mpu(), ps)
    model.to(device=device, dtype=dtype)
    # Both copies of a tied embedding read it from the checkpoint, so they start equal.
    load_weights(model, cfg.model.init_from, cfg.train.seed, ps.tp_rank, ps.tp, ps.dp_rank, False, cfg.tokenizer.path,
                 cfg.tokenizer.new_embedding_init, params=model.megakor_parameters(tied_copies=True))
    mark_for_pipeline_grad_norm(model, ps.tp_rank)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                           config=copy.deepcopy(ds_config))
    for m in engine.module.modules():  # fp32 RoPE frequencies whatever DeepSpeed's module cast did to buffers
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_inv_freq(args).to(device)
    return engine, ds_config, dtype
