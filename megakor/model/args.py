"""Model architecture arguments, the named size presets, and reading/writing HF `config.json`.

A model size is data (litgpt's habit): `ModelArgs` holds everything the LLaMA architecture needs,
`PRESETS` names common sizes, and `from_hf_config` / `to_hf_config` translate Hugging Face's
`config.json` of the families we support.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class ModelArgs:
    model_type: str = "llama"  # HF family: llama | mistral | qwen2
    vocab_size: int = 32000  # real vocabulary (tokens); TP padding is added by the layers
    hidden_size: int = 4096
    intermediate_size: int = 11008  # SwiGLU inner width
    num_layers: int = 32
    num_heads: int = 32  # query heads
    num_kv_heads: int = 32  # key/value heads (GQA when fewer than num_heads)
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF `rope_scaling` / `rope_parameters` minus rope_theta: {"rope_type": "llama3", "factor": 8, ...}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096  # tokens; dynamic/llama3 scaling reads it
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias=True sets it too)
    mlp_bias: bool = False
    sliding_window: int | None = None  # tokens; Mistral v0.1 (None = full causal attention)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    initializer_range: float = 0.02  # std of random init for presets

    def __post_init__(self):
        if self.model_type not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"model_type '{self.model_type}' is not supported; megakor loads {', '.join(SUPPORTED_FAMILIES)} "
                "checkpoints (convert others to one of these families first)"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; fix the checkpoint config"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type '{rope_type}' is not supported; use one of {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def rope_type(self) -> str:
        s = self.rope_scaling or {}
        return s.get("rope_type", s.get("type", "default"))

    def num_parameters(self, include_embedding: bool = True) -> int:
        d, hd = self.hidden_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
        mlp = 3 * d * self.intermediate_size + (2 * self.intermediate_size + d if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        n = self.num_layers * per_layer + d
        if include_embedding:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return n


# Named sizes. Each mirrors the HF config.json named beside it (random init, for tests, benchmarks
# and from-scratch runs); real training starts from a checkpoint directory instead.
PRESETS: dict[str, dict[str, Any]] = {
    # A tiny model for tests and CI: 2 layers, GQA 4/2, vocab of the byte-level test tokenizers.
    "debug": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4,
                  num_kv_heads=2, max_position_embeddings=1024, rope_theta=10000.0),
    # ~50M parameters: the CPU benchmark size (vocab 32k, 8 layers, hidden 512).
    "llama-50m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                      num_kv_heads=4, max_position_embeddings=2048, rope_theta=500000.0),
    # HuggingFaceTB/SmolLM2-135M config.json
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # A ~1B Llama-3-style model (hidden 2048, 16 layers, 32/8 heads, vocab 128,256): the GPU MFU size.
    "llama3-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                      num_kv_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                      tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-3.1-8B config.json
    "llama3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                        bos_token_id=128000, eos_token_id=128001,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-3.1-70B config.json
    "llama3.1-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                         num_kv_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                         bos_token_id=128000, eos_token_id=128001,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # meta-llama/Llama-2-7b-hf config.json
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                      num_kv_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; use one of {', '.join(PRESETS)} or an HF checkpoint directory")
    return ModelArgs(**{**PRESETS[name], **overrides})


def _rope_from_hf(cfg: dict) -> tuple[float, dict | None]:
    """RoPE settings from either transformers 5 `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = params or cfg.get("rope_scaling") or None
    if scaling:
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    return float(theta), scaling


def from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a Hugging Face `config.json` dict; refuses families and features we do not run."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"model_type '{model_type}' is not supported; megakor loads {', '.join(SUPPORTED_FAMILIES)} checkpoints"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act '{act}' is not supported; LLaMA-class models use 'silu' (SwiGLU)")
    theta, scaling = _rope_from_hf(cfg)
    heads = cfg["num_attention_heads"]
    sliding = cfg.get("sliding_window")
    if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
        sliding = None
    qkv_bias = bool(cfg.get("attention_bias", False)) or model_type == "qwen2"
    return ModelArgs(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_bias=model_type == "llama" and bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=sliding,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        initializer_range=cfg.get("initializer_range", 0.02),
    )


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def to_hf_config(args: ModelArgs, base: dict | None = None, dtype: str = "float32") -> dict:
    """A `config.json` dict for `args`. With `base` (the source checkpoint's config), every field we do
    not own is kept as it was, so an export changes only what training changed (e.g. vocab_size)."""
    cfg = dict(base or {})
    cfg.update(
        model_type=args.model_type,
        architectures=[_ARCHITECTURES[args.model_type]],
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.rms_norm_eps,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        hidden_act="silu",
        bos_token_id=args.bos_token_id,
        eos_token_id=args.eos_token_id,
    )
    if base is None:
        cfg.setdefault("initializer_range", args.initializer_range)
        cfg["torch_dtype"] = dtype
    if args.model_type == "llama":
        cfg["attention_bias"] = args.o_bias
        cfg["mlp_bias"] = args.mlp_bias
    if args.model_type == "mistral":
        cfg["sliding_window"] = args.sliding_window
    # Write RoPE the way the source did (transformers 5: rope_parameters; 4.x: rope_theta + rope_scaling).
    if "rope_parameters" in cfg or base is None:
        cfg.pop("rope_theta", None)
        cfg.pop("rope_scaling", None)
        cfg["rope_parameters"] = {"rope_theta": args.rope_theta, "rope_type": "default", **(args.rope_scaling or {})}
    else:
        cfg["rope_theta"] = args.rope_theta
        cfg["rope_scaling"] = args.rope_scaling
    return cfg


def replace(args: ModelArgs, **changes) -> ModelArgs:
    return dataclasses.replace(args, **changes)


__all__ = ["ModelArgs", "PRESETS", "preset", "from_hf_config", "to_hf_config", "replace"]
