"""One typed run configuration: dataclass sections loaded from YAML, with `section.key=value` overrides.

    cfg = load_config("configs/runs/tiny_cpu.yaml", ["train.steps=20", "data.sources=[{path: x, weight: 1}]"])

Override values are parsed as YAML, so numbers, booleans, lists and mappings work on any command line.
Unknown keys and wrong types are errors naming the key and the nearest valid one. Cross-field rules
(parallel layout, batch arithmetic) are checked in `validate` before any process group exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration mistake; the message is one sentence naming the fix."""


@dataclass
class ModelConfig:
    init_from: str = "debug"
    """HF checkpoint directory, a .gguf file, or a size preset name (megakor.model.args.PRESETS)."""
    attention: str = "auto"
    """Attention backend: auto (on CUDA one varlen call per layer over all packed documents: flash-attn's
    kernel when installed, else torch.nn.attention.varlen; SDPA per document on CPU), flash, varlen, sdpa."""
    dtype: str = "auto"
    """Training dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32."""
    loss_chunk_tokens: int = 1024
    """Tokens per chunk of the LM-head + cross-entropy: fp32 logits memory is chunk × vocab/TP × 4 bytes
    (1024 × 128,256 → 0.5 GB), whatever the batch."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them."""


@dataclass
class TokenizerConfig:
    path: str | None = None
    """Tokenizer directory; None = the tokenizer files inside model.init_from."""
    new_embedding_init: str = "subword"
    """How rows for tokens the base model lacks are initialised: subword (mean of the base tokenizer's
    decomposition rows), mean (mean of all rows) or random."""


@dataclass
class DataConfig:
    sources: list[dict] = field(default_factory=list)
    """Training mixture: a list of {path, weight[, name, text_field, ...cleaning options]}; path is a
    preprocessed prefix or raw files (preprocessed into cache_dir on first use). A source with
    `distill: true` is replay scored against the starting model (model.init_from, kept frozen beside the
    one that trains, one full copy per rank): its tokens' loss is KL(start ‖ model) over the vocabulary
    instead of cross-entropy on its text (self-distillation against forgetting)."""
    eval: list[dict] = field(default_factory=list)
    """Held-out evaluation sources, same entries as `sources` (weight unused); each is reported by name."""
    cache_dir: str = "cache/data"
    """Where raw sources are preprocessed to, once, shared by all ranks."""
    workers: int = 2
    """Tokenizer worker processes for preprocessing."""
    max_inline_preprocess_bytes: int = 1 << 30
    """Bytes of raw input (1 GiB by default, about 10 minutes at ~1M tokens/s with 2 workers) above which a
    multi-process job refuses to preprocess a raw source itself, on first use, while every GPU waits:
    preprocess it off the GPUs with `sbatch --array=0-N slurm/preprocess.sh` and name the prefix instead.
    0 = no limit. A single-process run and a source already preprocessed into cache_dir are never refused."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    """Tensor-parallel size (must divide attention heads and KV heads)."""
    pipeline: int = 1
    """Pipeline stages (> 1 selects DeepSpeed pipeline mode with ZeRO 0 or 1)."""
    zero_stage: int = 3
    """ZeRO stage: 3 for the DP × TP mode; 0 or 1 with pipeline parallelism."""
    offload_optimizer: bool = False
    """ZeRO-3: keep optimizer states in CPU memory."""
    offload_params: bool = False
    """ZeRO-3: keep parameters in CPU memory between uses."""
    pipeline_partition: str = "parameters"
    """How layers are spread over pipeline stages: parameters or uniform (layers)."""
    zero3_leaf_modules: bool = True
    """ZeRO-3: treat each decoder block as one leaf module, so its parameters are gathered together by
    one hook per block instead of one per linear layer (less host time per step, one block's weights
    live at once). On an H200 (bench/gpu.py, llama3-1b, one run) it ran 1.10x the tokens/s of per-layer
    hooks with a steadier step time (p90/p50 1.01 against 1.12); false restores per-layer gathering."""
    timeout_seconds: int = 600
    """Seconds a collective (or the start-up rendezvous) waits for a missing rank before the job fails
    (DeepSpeed's default, 600); it must cover the longest gap between collectives (a checkpoint save,
    raw-data preprocessing on one rank). A rank that raises ends the job at once whatever this says."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    seq_len: int = 2048
    """Tokens per sequence."""
    micro_batch: int = 1
    """Sequences per rank per forward pass."""
    global_batch: int = 8
    """Sequences per optimizer step (= micro_batch × grad accumulation × data-parallel size)."""
    seed: int = 1234
    """Seed for initialisation, data order and dropout-free RNG state."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    eval_every: int = 0
    """Evaluate on data.eval every this many steps (0 = only at the end)."""
    eval_batches: int = 8
    """Micro-batches per evaluation source (0 = the whole split)."""
    eval_generate: int = 0
    """Task eval sources (format: chat): at each evaluation also answer the first N examples greedily and log
    eval/<name>_chrf (0 = off; parallel.tensor=1 and parallel.pipeline=1 only)."""
    eval_max_new_tokens: int = 64
    """Tokens generated per answer at most, with train.eval_generate."""
    freeze: str = "none"
    """What does not train: none, or new_embeddings_only (only rows of tokens added by vocabulary
    extension train; every other parameter receives zero update)."""
    frozen_layers: str = ""
    """Decoder layers whose weights do not train, as "first-last" (e.g. "8-21"; "" = none). Partial freezing
    against forgetting: the embeddings, the head and the other layers train (with train.freeze=none)."""
    max_skipped_steps: int = 10
    """Consecutive steps with a non-finite loss or gradient norm (each skipped: no weight update, its
    batch not retried) after which training stops with an error, keeping its last checkpoint; 0 = never."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of decay."""
    schedule: str = "cosine"
    """cosine, wsd (warmup-stable-decay) or constant."""
    warmup_steps: int = 100
    """Linear warmup from zero (re-warming matters in continued pretraining)."""
    decay_steps: int = 0
    """wsd: length of the final decay phase in steps (0 = 20% of train.steps)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    implementation: str = "torch"
    """torch: torch.optim.AdamW (fused on GPU), nothing compiled at start-up; deepspeed: DeepSpeed's
    FusedAdam / CPUAdam (offload), JIT-built with nvcc on first use."""


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    """Where DeepSpeed checkpoints and training state go; training resumes from its latest."""
    every: int = 0
    """Save every this many steps (0 = only at the end)."""
    keep: int = 2
    """Checkpoints kept; older ones are removed after a new one is published (0 keeps all)."""
    save_at_end: bool = True
    """Save when training ends or is stopped by a signal; false only for throwaway runs and benchmarks
    (a stop by SIGUSR1/SIGTERM still saves, so it can be resumed)."""


@dataclass
class LoggingConfig:
    tensorboard_dir: str = "runs/default/tensorboard"
    """TensorBoard event directory (empty string disables)."""
    log_every: int = 1
    """Console/TensorBoard logging interval in steps."""
    profile_step: int = 0
    """Profile this optimizer step with torch.profiler (0 = never): the busiest operators by device and host
    time go to profile_step<N>.txt beside the event files (rank 0)."""


@dataclass
class DeepSpeedConfig:
    config: str | None = None
    """A DeepSpeed JSON whose fields override the generated ones (conflicts with our config are reported)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    ("model", "attention"): ("auto", "flash", "varlen", "sdpa"),
    ("model", "dtype"): ("auto", "bf16", "fp32"),
    ("tokenizer", "new_embedding_init"): ("subword", "mean", "random"),
    ("parallel", "pipeline_partition"): ("parameters", "uniform"),
    ("optim", "schedule"): ("cosine", "wsd", "constant"),
    ("optim", "implementation"): ("torch", "deepspeed"),
    ("train", "freeze"): ("none", "new_embeddings_only"),
}


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return close[0] if close else ""


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to `tp` where lossless (int → float), else a ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}; write it as [a, b] in YAML")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}; write it as {{key: value}} in YAML")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML reads 3e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            # YAML 1.1 reads `on:`, `yes:`, `no:` as booleans and `100:` as a number.
            place = f"in section '{where[:-1]}'" if where else "at the top level"
            kind = "boolean" if isinstance(key, bool) else "number"
            raise ConfigError(f"config key {key!r} {place} is not a name but a {kind}; quote it or fix the line "
                              "(YAML reads on, off, yes and no as booleans and bare digits as numbers)")
        if key not in names:
            hint = _nearest(key, names)
            raise ConfigError(f"unknown config key '{where}{key}'; did you mean '{where}{hint}'?")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}{key}' is a section; give it as a mapping of keys")
            kwargs[key] = _build(tp, value, f"{where}{key}.")
        else:
            kwargs[key] = _check_type(value, tp, f"{where}{key}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """`["train.steps=20", "optim.betas=[0.9, 0.99]"]` → nested dict, values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({e.problem}); quote it") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key inside '{part}', which is a value, not a section")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (or defaults) plus dotted overrides, validated."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file (see configs/runs/)")
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                              "save it as UTF-8, e.g. iconv -f cp949 -t utf-8") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"config file {p} is not valid YAML{at} ({getattr(e, 'problem', None) or e}); "
                              "fix that line") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p} must hold a mapping of sections (model:, train:, ...)")
    values = _merge(values, parse_overrides(overrides or []))
    cfg = _build(Config, values, "")
    _expand_home(cfg)
    validate(cfg)
    return cfg


# Fields that name a path: a `~` there is the user's home (YAML and quoted overrides reach us unexpanded).
_PATH_FIELDS = (("model", "init_from"), ("tokenizer", "path"), ("data", "cache_dir"), ("checkpoint", "dir"),
                ("logging", "tensorboard_dir"), ("deepspeed", "config"))


def _expand_home(cfg: Config) -> None:
    for section, key in _PATH_FIELDS:
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, str) and value.startswith("~"):
            setattr(getattr(cfg, section), key, os.path.expanduser(value))
    for entries in (cfg.data.sources, cfg.data.eval):
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("path"), (str, list)):
                path = entry["path"]
                entry["path"] = ([os.path.expanduser(x) if isinstance(x, str) else x for x in path]
                                 if isinstance(path, list) else os.path.expanduser(path))


def distilled_sources(cfg: Config) -> list[str]:
    """Names (or paths) of the training sources scored against the starting model (`distill: true`)."""
    return [e.get("name") or str(e.get("path")) for e in cfg.data.sources if isinstance(e, dict) and e.get("distill")]


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Rules that span fields; with `world_size`, also the parallel layout and batch arithmetic."""
    for (section, key), options in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in options:
            raise ConfigError(f"{section}.{key}={value!r} is not valid; use one of {', '.join(options)}")
    for section, key in (("train", "steps"), ("train", "seq_len"), ("train", "micro_batch"),
                         ("train", "global_batch"), ("parallel", "tensor"), ("parallel", "pipeline"),
                         ("model", "loss_chunk_tokens")):
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{section}.{key} must be at least 1")
    for section, key in (("train", "eval_every"), ("train", "eval_batches"), ("train", "max_skipped_steps"),  # 0 = off
                         ("train", "eval_generate"), ("train", "eval_max_new_tokens"),
                         ("optim", "warmup_steps"), ("optim", "decay_steps"), ("checkpoint", "every"),
                         ("checkpoint", "keep"), ("data", "workers"), ("data", "max_inline_preprocess_bytes")):
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"{section}.{key} must be 0 or more")
    layer_range(cfg.train.frozen_layers)  # the format; the model's layer count is checked in preflight
    if cfg.logging.log_every < 1:
        raise ConfigError("logging.log_every must be at least 1")
    p = cfg.parallel
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    if p.pipeline > 1 and p.zero_stage > 1:
        raise ConfigError(
            f"parallel.zero_stage={p.zero_stage} cannot be combined with parallel.pipeline={p.pipeline} "
            "(DeepSpeed supports only ZeRO 0/1 with pipeline parallelism); set parallel.zero_stage=1 or parallel.pipeline=1"
        )
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params needs parameter partitioning; set parallel.zero_stage=3 "
                          f"(it is {p.zero_stage}) or parallel.offload_params=false")
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer needs ZeRO; set parallel.zero_stage to 1, 2 or 3 "
                          "or parallel.offload_optimizer=false")
    _validate_optim(cfg)
    if p.timeout_seconds < 1:
        raise ConfigError(f"parallel.timeout_seconds={p.timeout_seconds} must be at least 1 (seconds)")
    if cfg.train.eval_generate and (p.tensor > 1 or p.pipeline > 1):
        raise ConfigError("train.eval_generate decodes on one rank's full copy of the model, which needs "
                          "parallel.tensor=1 and parallel.pipeline=1; set train.eval_generate=0 and score the "
                          "export with launch/evaluate.py --generate")
    evaluated = [e.get("name") or str(e.get("path")) for e in cfg.data.eval if isinstance(e, dict) and e.get("distill")]
    if evaluated:
        raise ConfigError(f"data.eval source(s) {evaluated} set distill: true, which only training sources use "
                          "(evaluation always scores cross-entropy on the text); remove distill from data.eval")
    distilled = distilled_sources(cfg)
    if distilled and (p.tensor > 1 or p.pipeline > 1):
        raise ConfigError(f"data source(s) {distilled} set distill: true, which scores them against a full copy of "
                          f"the starting model on each rank; set parallel.tensor=1 and parallel.pipeline=1 "
                          f"(they are {p.tensor} and {p.pipeline}) or distill: false")
    if world_size is not None:
        validate_schedule(cfg)
        model_parallel = p.tensor * p.pipeline
        if world_size % model_parallel:
            raise ConfigError(
                f"{world_size} processes cannot be split into parallel.tensor={p.tensor} × parallel.pipeline={p.pipeline}; "
                f"use a world size that is a multiple of {model_parallel}"
            )
        dp = world_size // model_parallel
        t = cfg.train
        if t.global_batch % (t.micro_batch * dp):
            raise ConfigError(
                f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch} × "
                f"data-parallel size {dp}; use a multiple of {t.micro_batch * dp}"
            )


def _validate_optim(cfg: Config) -> None:
    """Optimizer values and their relations to each other."""
    o, t = cfg.optim, cfg.train
    for key in ("lr", "min_lr", "weight_decay", "eps"):
        value = getattr(o, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"optim.{key}={value} must be a finite number of 0 or more")
    if o.eps == 0:
        raise ConfigError("optim.eps=0 divides by zero in AdamW's update; use a small positive value such as 1e-8")
    if o.min_lr > o.lr and o.schedule != "constant":
        raise ConfigError(f"optim.min_lr={o.min_lr} is above optim.lr={o.lr}; optim.schedule={o.schedule} decays "
                          "from lr down to min_lr, so set min_lr at most lr")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, got {o.betas}")
    for i, beta in enumerate(o.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.betas[{i}]={beta} is outside [0, 1); AdamW's betas are decay rates such as "
                              "[0.9, 0.95]")
    if not math.isfinite(t.grad_clip) or t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be a finite norm of 0 or more (0 disables clipping)")


def validate_schedule(cfg: Config) -> None:
    """The schedule against train.steps (checked for a training run, not when a tool only reads a config)."""
    o, t = cfg.optim, cfg.train
    if o.warmup_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} is longer than train.steps={t.steps}; the peak "
                          f"optim.lr would never be reached: use at most {t.steps} warmup steps")
    if o.schedule == "wsd" and o.warmup_steps + o.decay_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} + optim.decay_steps={o.decay_steps} is longer than "
                          f"train.steps={t.steps}; shorten them so that warmup and decay fit in the run")
    if o.schedule != "wsd" and o.decay_steps:
        raise ConfigError(f"optim.decay_steps={o.decay_steps} applies to optim.schedule=wsd only (it is "
                          f"{o.schedule}); remove it or set optim.schedule=wsd")


def layer_range(spec: str, num_layers: int | None = None) -> range:
    """The decoder layers a "first-last" spec names ("8-21" → 8..21, "5" → 5, "" → none); with
    `num_layers`, they must exist."""
    if spec in ("", None):
        return range(0)
    first, dash, last = str(spec).partition("-")
    try:
        if dash and not last:
            raise ValueError
        layers = range(int(first), int(last or first) + 1)
    except ValueError:
        raise ConfigError(f"train.frozen_layers={spec!r} is not a layer range; write first-last, e.g. \"8-21\"") from None
    if layers.start < 0 or len(layers) == 0:
        raise ConfigError(f"train.frozen_layers={spec!r} names no layers; write first-last with first <= last, e.g. \"8-21\"")
    if num_layers is not None and layers.stop > num_layers:
        raise ConfigError(f"train.frozen_layers={spec!r} reaches past the model's {num_layers} layers (0-{num_layers - 1})")
    return layers


def validate_model_layout(cfg: Config, num_heads: int, num_kv_heads: int, num_layers: int) -> None:
    """Parallel rules that need the model's shape (read from config.json before any weights)."""
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    for what, n in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if n % tp:
            ok = [d for d in range(1, n + 1) if n % d == 0 and num_heads % d == 0 and num_kv_heads % d == 0]
            raise ConfigError(
                f"parallel.tensor={tp} does not divide {what}={n}; use {', '.join(map(str, ok))}"
            )
    if pp > num_layers:
        raise ConfigError(f"parallel.pipeline={pp} exceeds the model's {num_layers} layers; use at most {num_layers}")
    layer_range(cfg.train.frozen_layers, num_layers)


def parse_job_arguments(cls, argv, description: str):
    """A job dataclass (DefaultJob, FinetuneJob) from `--field-name value` options, one per field, each
    defaulting to the field's default. Annotations are strings (PEP 563): "int" and "int | None" parse
    as int, "float" likewise, "bool" as true/false, anything else as a string; None keeps a "... | None"
    field unset."""
    import argparse

    def boolean(text: str) -> bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = {"int": int, "float": float, "bool": boolean}.get(str(f.type).split(" |")[0], str)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    return cls(**vars(ap.parse_args(argv)))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
