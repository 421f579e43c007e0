"""What a model source is: the one resolver behind `model.init_from` and every tool's `--model`.

    source = resolve_model_source("runs/ko/checkpoints")   # ModelSource(kind="training", ...)
    source.args()          # the architecture, read without any weight (config.json, GGUF metadata, meta.json)
    source.check_files()   # every shard present, every safetensors header readable, every tensor listed
    source.open()          # an HFCheckpoint for sliced reads (None for a preset)

A source is one of
  preset     a name in megakor.model.args.PRESETS (random initialisation);
  hf         a Hugging Face directory: config.json plus safetensors (sharded or not) or pytorch_model.bin;
  gguf       a llama.cpp .gguf file;
  training   a megakor checkpoint.dir (its newest complete checkpoint) or one global_step* directory,
             read through its model export.
Training, evaluation, generation, conversion and the planner all ask this module, so they agree on
what a path means. Mistakes are `ConfigError`s naming the key (or flag) and the path.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megakor.config import ConfigError
from megakor.model.args import PRESETS, ModelArgs, from_hf_config, preset, to_hf_config

KINDS = ("preset", "hf", "gguf", "training")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on a header


@dataclass(frozen=True)
class ModelSource:
    kind: str  # one of KINDS
    spec: str  # as the user wrote it
    path: Path | None  # the directory or file read (training: the global_step* directory); None for a preset
    key: str = "model.init_from"  # the config key or flag it came from, for messages

    def _fail(self, why: str) -> ConfigError:
        return ConfigError(f"{self.key}={self.spec}: {why}")

    # ---- architecture, without weights -----------------------------------------------------------

    def hf_config(self) -> dict:
        """The config.json this source describes (a preset's or a GGUF file's as converted)."""
        if self.kind == "preset":
            return to_hf_config(preset(self.spec))
        if self.kind == "hf":
            file = self.path / "config.json"
            try:
                cfg = json.loads(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise self._fail(f"{file} is not UTF-8 JSON; re-download the checkpoint's config.json") from None
            except json.JSONDecodeError as e:
                raise self._fail(f"{file} is not valid JSON ({e.msg}, line {e.lineno}); the file is truncated or "
                                 "edited by hand: re-download the checkpoint's config.json") from None
            if not isinstance(cfg, dict):
                raise self._fail(f"{file} holds a {type(cfg).__name__}, not a JSON object of model settings")
            return cfg
        if self.kind == "gguf":
            import gguf

            from megakor.checkpoint.gguf import config_from_metadata, read_metadata

            try:
                reader = gguf.GGUFReader(self.path)
                shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
                return config_from_metadata(read_metadata(reader), shapes, self.path)
            except (ValueError, KeyError, OSError) as e:
                raise self._fail(f"{self.path} is not a readable GGUF file ({e}); re-download it") from None
        meta = self._training_meta()
        return to_hf_config(ModelArgs(**meta["args"]), meta.get("hf_config"))

    def args(self) -> ModelArgs:
        """The architecture: model_type supported, the fields megakor needs present."""
        if self.kind == "preset":
            return preset(self.spec)
        if self.kind == "training":
            return ModelArgs(**self._training_meta()["args"])
        cfg = self.hf_config()
        try:
            return from_hf_config(cfg)
        except KeyError as e:
            raise self._fail(f"{self._config_name()} lacks the field {e.args[0]!r} that a LLaMA-class config.json "
                             "has; re-download the checkpoint's config.json") from None
        except (ValueError, TypeError) as e:
            raise self._fail(f"{e} ({self._config_name()})") from None

    def _config_name(self) -> str:
        return str(self.path / "config.json") if self.kind == "hf" else str(self.path)

    def _training_meta(self) -> dict:
        from megakor.checkpoint.training import EXPORT_DIR

        file = self.path / EXPORT_DIR / "meta.json"
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise self._fail(f"{file} is unreadable ({e}); the checkpoint is incomplete") from None

    def tokenizer_dir(self) -> Path | None:
        """Where this model's own tokenizer files are (None for a preset, a GGUF file, or a directory
        without them)."""
        if self.kind == "hf":
            return self.path if _has_tokenizer(self.path) else None
        if self.kind == "training":
            from megakor.checkpoint.training import EXPORT_DIR

            tok = self.path / EXPORT_DIR / "tokenizer"
            return tok if _has_tokenizer(tok) else None
        return None

    # ---- files, before any weight is read --------------------------------------------------------

    def check_files(self) -> None:
        """Every weight file present and well-formed, and every tensor the architecture needs listed in
        them, by reading headers only (safetensors: 8 bytes and a JSON header per file)."""
        if self.kind == "hf":
            from megakor.checkpoint.hf import key_map

            shapes = _hf_tensor_shapes(self.path, self._fail)
            if shapes is None:  # pytorch_model.bin: no header to read without unpickling
                return
            args = self.args()
            missing = sorted(set(key_map(args)) - set(shapes))
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise self._fail(f"the weight files in {self.path} lack tensor {missing[0]}{more} that its config.json "
                                 "implies; the download is incomplete or config.json "
                                 "belongs to another model")
            for name, want in _expected_shapes(args).items():
                if name in shapes and list(shapes[name]) != want:
                    raise self._fail(f"{self.path}/config.json implies {name} of shape {want} but the weight files "
                                     f"hold {list(shapes[name])}; config.json belongs to another model")
        elif self.kind == "training":
            from megakor.checkpoint.training import EXPORT_DIR

            meta = self._training_meta()
            export = self.path / EXPORT_DIR
            for r in range(meta.get("tp", 1)):
                if not list(export.glob(f"tp{r:02d}-*.safetensors")):
                    raise self._fail(f"{export} lacks the slices of tensor-parallel rank {r}; the checkpoint is "
                                     "incomplete: use an earlier global_step* directory")
        elif self.kind == "gguf":
            self.hf_config()

    # ---- weights ---------------------------------------------------------------------------------

    def open(self):
        """An HFCheckpoint for sliced reads (a GGUF file dequantised, a training checkpoint's export
        merged, both in memory); None for a preset."""
        from megakor.checkpoint.hf import HFCheckpoint

        if self.kind == "preset":
            return None
        if self.kind == "hf":
            return HFCheckpoint(self.path)
        if self.kind == "gguf":
            from megakor.checkpoint.gguf import load_gguf_state_dict

            hf_config, state_dict = load_gguf_state_dict(self.path)
            return HFCheckpoint.from_state_dict(hf_config, state_dict, path=self.path)
        from megakor.checkpoint.hf import to_hf_state_dict
        from megakor.checkpoint.training import read_export

        merged, args, hf_config, tokenizer = read_export(self.path)
        return HFCheckpoint.from_state_dict(to_hf_config(args, hf_config), to_hf_state_dict(merged, args),
                                            path=self.path, tokenizer_path=tokenizer)


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file())


def resolve_model_source(spec: str, key: str = "model.init_from") -> ModelSource:
    """Decide what `spec` is (module docstring); `key` names the setting in error messages."""
    spec = str(spec)
    if spec in PRESETS:
        return ModelSource("preset", spec, None, key)
    p = Path(spec).expanduser()
    choices = (f"use an HF checkpoint directory (with config.json), a .gguf file, a megakor checkpoint.dir, "
               f"or a preset ({', '.join(PRESETS)})")
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"{key}={spec}: GGUF file {p} does not exist; fix the path")
        return ModelSource("gguf", spec, p, key)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ModelSource("hf", spec, p, key)
        from megakor.checkpoint.training import is_training_checkpoint, resolve_tag_dir

        if is_training_checkpoint(p):
            try:
                return ModelSource("training", spec, resolve_tag_dir(p), key)
            except FileNotFoundError as e:
                raise ConfigError(f"{key}={spec}: {e}") from None
        raise ConfigError(f"{key}={spec}: the directory holds neither config.json nor a megakor checkpoint; {choices}")
    if p.exists():
        raise ConfigError(f"{key}={spec} is a file but not a .gguf file; {choices}")
    raise ConfigError(f"{key}={spec!r} is neither an existing path nor a preset; {choices}")


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (no tensor is read).
    Raises ValueError saying what is wrong."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} has {size} bytes, too few for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{file} declares a {n}-byte header in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{file} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file} has a corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{file} has a corrupt safetensors header (entry {name!r})") from None
        if not 0 <= start <= end <= data:
            raise ValueError(f"{file} is truncated: tensor {name} ends at byte {end} of a {data}-byte data section")
    return header


def _expected_shapes(args: ModelArgs) -> dict[str, list[int]]:
    """Shapes config.json implies for the tensors that pin the architecture down (embedding, layer 0)."""
    d, hd = args.hidden_size, args.head_dim
    attn, mlp = "model.layers.0.self_attn", "model.layers.0.mlp"
    return {"model.embed_tokens.weight": [args.vocab_size, d], f"{attn}.q_proj.weight": [args.num_heads * hd, d],
            f"{attn}.k_proj.weight": [args.num_kv_heads * hd, d], f"{mlp}.gate_proj.weight": [args.intermediate_size, d],
            f"{mlp}.down_proj.weight": [d, args.intermediate_size]}


def _hf_tensor_shapes(d: Path, fail) -> dict[str, list[int]] | None:
    """{tensor name: shape} across an HF directory's weight files (every shard present, headers sound);
    None for pickled pytorch_model.bin checkpoints."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise fail(f"{index} is not a valid safetensors index (no weight_map); re-download it") from None
        files = sorted(set(weight_map.values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (d / "pytorch_model.bin").is_file() or (d / "pytorch_model.bin.index.json").is_file():
        index = d / "pytorch_model.bin.index.json"
        if index.is_file():
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            missing = sorted(f for f in shards if not (d / f).is_file())
            if missing:
                raise fail(f"checkpoint shard {missing[0]} listed in {index.name} is missing from {d}; copy or "
                           "re-download the complete checkpoint")
        return None
    else:
        raise fail(f"{d} has config.json but no weights (model.safetensors, its index, or pytorch_model.bin); copy "
                   "the weight files into it")
    shapes: dict[str, list[int]] = {}
    for name in files:
        file = d / name
        if not file.is_file():
            raise fail(f"checkpoint shard {name} listed in {index.name} is missing from {d}; copy or re-download the "
                       "complete checkpoint")
        try:
            header = safetensors_header(file)
        except (OSError, ValueError) as e:
            raise fail(f"{e}; re-download that file") from None
        shapes.update((k, v.get("shape")) for k, v in header.items() if k != "__metadata__")
    return shapes


def build_model(spec: str, tp_group=None, attention: str = "auto", loss_chunk_tokens: int = 1024,
                activation_checkpointing: bool = False, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0, key: str = "--model"):
    """(model, checkpoint-or-None) for one process: weights read as this TP rank's slices, or random
    init for a preset. Used by evaluation and generation."""
    from megakor.model.layers import tp_world
    from megakor.model.llama import Llama

    source = resolve_model_source(spec, key)
    source.check_files()
    ckpt = source.open()
    args = source.args() if ckpt is None else ckpt.args
    model = Llama(args, tp_group, attention, loss_chunk_tokens, activation_checkpointing)
    if ckpt is None:
        model.init_weights(torch.Generator().manual_seed(seed))
    else:
        from megakor.checkpoint.hf import load_into_model

        rank, size = tp_world(tp_group)
        load_into_model(model, ckpt, rank, size)
    return model.to(device=device, dtype=dtype), ckpt
