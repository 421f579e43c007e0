"""Hugging Face checkpoints in and out.

In: `HFCheckpoint` opens a directory (`config.json` + sharded or single safetensors, or the old
`pytorch_model.bin`) without reading any tensor; `load_state_dict` then reads exactly the slices one
tensor-parallel rank (and one pipeline stage: a subset of layers) owns, through safetensors' lazy
slicing, so no process ever holds the whole model.

Out: `save_hf_checkpoint` writes a directory `transformers.AutoModelForCausalLM` loads cleanly, with
the source's config fields kept and its tokenizer files copied.

The key maps between HF and megakor names are data, one per family, below.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megakor.model.args import ModelArgs, from_hf_config, to_hf_config
from megakor.model.layers import padded_vocab_size

# HF name → megakor name; "{}" is the layer index. Biases are added per checkpoint (see key_map).
_LLAMA_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
}
_QKV_BIAS_KEYS = {f"model.layers.{{}}.self_attn.{p}_proj.bias": f"layers.{{}}.attention.{p}_proj.bias" for p in "qkv"}
_O_BIAS_KEYS = {"model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.o_proj.bias"}
_MLP_BIAS_KEYS = {f"model.layers.{{}}.mlp.{p}_proj.bias": f"layers.{{}}.mlp.{p}_proj.bias" for p in ("gate", "up", "down")}

FAMILY_KEY_MAPS = {
    "llama": _LLAMA_KEYS,
    "mistral": _LLAMA_KEYS,
    "qwen2": {**_LLAMA_KEYS, **_QKV_BIAS_KEYS},  # Qwen2 always carries q/k/v biases
}

# How each megakor parameter is split across tensor-parallel ranks (by name suffix):
# "column" splits dim 0 (output features), "row" dim 1 (input features), "vocab" splits the padded
# vocabulary rows; anything else (norms, row-parallel biases) is replicated.
TP_SPLIT = {
    "attention.q_proj.weight": "column", "attention.k_proj.weight": "column", "attention.v_proj.weight": "column",
    "attention.q_proj.bias": "column", "attention.k_proj.bias": "column", "attention.v_proj.bias": "column",
    "mlp.gate_proj.weight": "column", "mlp.up_proj.weight": "column",
    "mlp.gate_proj.bias": "column", "mlp.up_proj.bias": "column",
    "attention.o_proj.weight": "row", "mlp.down_proj.weight": "row",
    "tok_embeddings.weight": "vocab", "lm_head.weight": "vocab",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "megakor_extension.json")


def key_map(args: ModelArgs) -> dict[str, str]:
    """HF → megakor names for every tensor of a checkpoint with these args."""
    template = dict(FAMILY_KEY_MAPS[args.model_type])
    if args.attention_bias:
        template.update(_QKV_BIAS_KEYS)
    if args.o_bias:
        template.update(_O_BIAS_KEYS)
    if args.mlp_bias:
        template.update(_MLP_BIAS_KEYS)
    if args.tie_word_embeddings:
        template.pop("lm_head.weight")
    out = {}
    for hf, mk in template.items():
        if "{}" in hf:
            for i in range(args.num_layers):
                out[hf.format(i)] = mk.format(i)
        else:
            out[hf] = mk
    return out


def tp_split_kind(megakor_name: str) -> str | None:
    for suffix, kind in TP_SPLIT.items():
        if megakor_name.endswith(suffix):
            return kind
    return None


def layer_index(megakor_name: str) -> int | None:
    parts = megakor_name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


class HFCheckpoint:
    """A Hugging Face checkpoint opened for lazy, sliced reads (or an in-memory state dict, for GGUF)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.path} is not a Hugging Face checkpoint directory (no config.json); pass a directory "
                "saved by save_pretrained, a .gguf file, or a preset name as model.init_from"
            )
        self.hf_config = json.loads((self.path / "config.json").read_text())
        self.args = from_hf_config(self.hf_config)
        self.tokenizer_path: Path | None = self.path  # where this model's tokenizer files are
        self._memory: dict[str, torch.Tensor] | None = None
        self._open: dict[str, object] = {}
        self._files = self._index()

    @classmethod
    def from_state_dict(cls, hf_config: dict, state_dict: dict[str, torch.Tensor], path=None,
                        tokenizer_path=None) -> "HFCheckpoint":
        self = cls.__new__(cls)
        self.path = Path(path) if path else None
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self.hf_config, self.args = hf_config, from_hf_config(hf_config)
        self._memory, self._open = state_dict, {}
        self._files = {k: "<memory>" for k in state_dict}
        return self

    def _index(self) -> dict[str, str]:
        d = self.path
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index_name).is_file():
                weight_map = json.loads((d / index_name).read_text())["weight_map"]
                missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
                if missing:
                    raise FileNotFoundError(
                        f"checkpoint shard {missing[0]} listed in {index_name} is missing from {d}; "
                        "copy or re-download the complete checkpoint"
                    )
                return dict(weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (d / single).is_file():
                return {k: single for k in self._keys_of(single)}
        raise FileNotFoundError(
            f"{d} has config.json but no weights (model.safetensors, its index, or pytorch_model.bin); "
            "copy the weight files into it"
        )

    def _handle(self, file: str):
        if file not in self._open:
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                self._open[file] = safe_open(str(self.path / file), framework="pt")
            else:
                # Old checkpoints: mmap so slicing touches only the pages it needs.
                self._open[file] = torch.load(self.path / file, map_location="cpu", mmap=True, weights_only=True)
        return self._open[file]

    def _keys_of(self, file: str):
        h = self._handle(file)
        return list(h.keys())

    def keys(self) -> list[str]:
        return list(self._files)

    def file_of(self, key: str) -> str:
        """The weight file (relative to the checkpoint directory) that holds `key`."""
        return self._files[key]

    def shape(self, key: str) -> list[int]:
        if self._memory is not None:
            return list(self._memory[key].shape)
        h = self._handle(self._files[key])
        return list(h.get_slice(key).get_shape()) if hasattr(h, "get_slice") else list(h[key].shape)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor `key`, or only rows/columns [start, stop) along `dim`, read lazily."""
        if key not in self._files:
            raise KeyError(f"tensor {key} is not in the checkpoint at {self.path}; is it the right family/size?")
        if self._memory is not None:
            t = self._memory[key]
        else:
            h = self._handle(self._files[key])
            if hasattr(h, "get_slice"):
                sl = h.get_slice(key)
                if dim is None:
                    return sl[:]
                idx = [slice(None)] * len(sl.get_shape())
                idx[dim] = slice(start, stop)
                return sl[tuple(idx)]
            t = h[key]
        return t if dim is None else t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start).clone()


def load_state_dict(ckpt: HFCheckpoint, tp_rank: int = 0, tp_size: int = 1, layers=None,
                    include_embedding: bool = True, include_norm: bool = True, include_head: bool = True,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """megakor-named tensors for one TP rank and (optionally) a subset of layers, read as slices.

    Vocabulary-split tensors are padded to `padded_vocab_size(vocab, tp_size)` rows (zeros), so each
    rank's slice has the same shape. `layers` is an iterable of layer indices (a pipeline stage);
    None means all. A tied head is served by the embedding (no separate `lm_head.weight`).
    """
    args = ckpt.args
    wanted_layers = None if layers is None else set(layers)
    padded = padded_vocab_size(args.vocab_size, tp_size)
    out = {}
    for hf_name, name in key_map(args).items():
        li = layer_index(name)
        if li is not None and wanted_layers is not None and li not in wanted_layers:
            continue
        if (name == "tok_embeddings.weight" and not include_embedding) or (name == "norm.weight" and not include_norm) \
                or (name == "lm_head.weight" and not include_head):
            continue
        if hf_name not in ckpt._files:
            raise KeyError(
                f"tensor {hf_name} is missing from the checkpoint at {ckpt.path}; the files do not match its config.json"
            )
        kind = tp_split_kind(name)
        if kind == "vocab":
            per = padded // tp_size
            lo, hi = tp_rank * per, (tp_rank + 1) * per
            rows = ckpt.read(hf_name, 0, min(lo, args.vocab_size), min(hi, args.vocab_size))
            t = torch.zeros((per, rows.shape[1]), dtype=rows.dtype)
            t[: rows.shape[0]] = rows
        elif kind in ("column", "row"):
            dim = 0 if kind == "column" else 1
            n = ckpt.shape(hf_name)[dim]
            per = n // tp_size
            t = ckpt.read(hf_name, dim, tp_rank * per, (tp_rank + 1) * per)
        else:
            t = ckpt.read(hf_name)
        out[name] = t.to(dtype) if dtype is not None else t
    return out


def load_into_model(model, ckpt: HFCheckpoint, tp_rank: int = 0, tp_size: int = 1):
    """Copy this rank's slices of `ckpt` into `model` (whose parameters are the rank's shapes)."""
    own = model.state_dict()
    layers = sorted({layer_index(k) for k in own if layer_index(k) is not None})
    sd = load_state_dict(ckpt, tp_rank, tp_size, layers, "tok_embeddings.weight" in own, "norm.weight" in own,
                         "lm_head.weight" in own)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint and model disagree (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "check that model.init_from matches the model configuration"
        )
    with torch.no_grad():
        for k, t in sd.items():
            if own[k].shape != t.shape:
                raise ValueError(f"{k}: checkpoint slice {tuple(t.shape)} does not fit parameter {tuple(own[k].shape)}")
            own[k].copy_(t)


def merge_tp_shards(shards: list[dict[str, torch.Tensor]], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Full tensors from per-TP-rank state dicts (inverse of `load_state_dict`'s slicing), vocabulary
    padding removed."""
    out = {}
    for name in shards[0]:
        kind = tp_split_kind(name)
        if kind in ("column", "vocab"):
            t = torch.cat([s[name] for s in shards], dim=0)
            out[name] = t[: args.vocab_size] if kind == "vocab" else t
        elif kind == "row":
            out[name] = torch.cat([s[name] for s in shards], dim=1)
        else:
            out[name] = shards[0][name]
    return out


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Full megakor tensors → HF names, vocabulary padding removed."""
    inverse = {mk: hf for hf, mk in key_map(args).items()}
    missing = sorted(set(inverse) - set(state_dict))
    if missing:
        raise KeyError(f"state dict lacks {missing[:3]} for a {args.model_type} model of {args.num_layers} layers")
    out = {}
    for mk, hf in inverse.items():
        t = state_dict[mk]
        if tp_split_kind(mk) == "vocab":
            t = t[: args.vocab_size]
        out[hf] = t.detach().contiguous().clone()
    return out


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | os.PathLike,
                       base_config: dict | None = None, tokenizer_dir: str | os.PathLike | None = None,
                       max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write `out_dir` as a Hugging Face checkpoint (safetensors, sharded above `max_shard_bytes`)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state_dict(state_dict, args)
    dtype = next(iter(hf.values())).dtype
    cfg = to_hf_config(args, base_config, dtype=str(dtype).replace("torch.", ""))
    shards, current, size = [], {}, 0
    for k, t in hf.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in hf.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    src, dst = Path(src), Path(dst)
    if src.is_file():  # a bare tokenizer.json
        shutil.copy2(src, dst / "tokenizer.json")
        return ["tokenizer.json"]
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
