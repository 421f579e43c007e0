"""Everything a run can check before any process group exists or any weight is read, in one place.

`preflight(cfg, world_size)` raises `ConfigError` (one sentence naming the key or path and the fix;
launch/train.py exits 2 with it) for
  config values and relations   `config.validate` (types, ranges, optimizer and schedule against
                                train.steps, the parallel layout and batch arithmetic), the model's
                                heads and layers against TP/PP, the DeepSpeed JSON;
  the model source              what model.init_from is (`megakor.checkpoint.source`), its config.json
                                parses and names a supported family, every weight shard present with a
                                sound safetensors header listing every tensor;
  the tokenizer                 tokenizer.path exists and loads, and the model's vocabulary holds it;
  data sources                  every entry well formed (keys, types, cleaning options, text_unit),
                                names unique, each source holding at least one readable document (raw
                                files) or documents of the model's vocabulary (preprocessed prefixes);
                                in a multi-process job, no raw source above
                                data.max_inline_preprocess_bytes left to preprocess (slurm/preprocess.sh);
  outputs                       checkpoint.dir, logging.tensorboard_dir and data.cache_dir are (or can
                                become) writable directories, and checkpoint.dir's filesystem has room
                                for one checkpoint (estimated from the parameter count);
  resume                        the checkpoint a run would resume from matches this layout.
Each check reads headers and metadata only, so a mistake costs seconds, not an allocation's start-up.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from megakor.config import Config, ConfigError, validate, validate_model_layout

log = logging.getLogger("megakor.train")

# Records read per raw source while looking for one readable document.
_MAX_RECORDS_PROBED = 2000


def preflight(cfg: Config, world_size: int):
    """Every check that needs no process group and reads no weight; returns the model's ModelArgs."""
    from megakor.checkpoint.source import resolve_model_source
    from megakor.train import checkpointing
    from megakor.train.engine import deepspeed_config, first_trainable_row, prepare_deepspeed_ops, resolved_model_args

    validate(cfg, world_size)
    p = cfg.parallel
    if p.pipeline > 1 and cfg.train.freeze != "none":
        raise ConfigError(f"train.freeze={cfg.train.freeze} is not supported in the pipeline mode yet; "
                          "run that stage with parallel.pipeline=1 (ZeRO-3 over DP × TP)")
    if p.pipeline > 1 and cfg.train.frozen_layers:
        raise ConfigError(f"train.frozen_layers={cfg.train.frozen_layers} is not supported in the pipeline mode yet; "
                          "run that stage with parallel.pipeline=1 (ZeRO-3 over DP × TP)")
    source = resolve_model_source(cfg.model.init_from)
    source.args()  # config.json parses, the family is supported
    source.check_files()  # every shard present, headers sound, every tensor listed
    _check_tokenizer_path(cfg)
    args = resolved_model_args(cfg)
    _check_vocabulary(cfg, args)
    first_trainable_row(cfg)  # train.freeze needs to know which vocabulary rows are new
    validate_model_layout(cfg, args.num_heads, args.num_kv_heads, args.num_layers)
    if cfg.train.seq_len > args.max_position_embeddings and args.rope_type != "dynamic":
        log.warning("train.seq_len=%d exceeds the model's max_position_embeddings=%d", cfg.train.seq_len,
                    args.max_position_embeddings)
    dp = world_size // (p.tensor * p.pipeline)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    deepspeed_config(cfg, dp, device_type)  # conflicts with deepspeed.config are errors now
    prepare_deepspeed_ops(cfg, device_type)  # DeepSpeed's own Adam asked for: nvcc present, arch list parseable
    raw = _check_data(cfg, args, world_size)
    _check_outputs(cfg, args, raw)
    checkpointing.check_resumable(cfg.checkpoint.dir, world_size, p.tensor, p.pipeline)
    return args


def tokenizer_dir(cfg: Config) -> str | None:
    """tokenizer.path, else the tokenizer files that come with model.init_from (None if there are none)."""
    if cfg.tokenizer.path:
        return cfg.tokenizer.path
    from megakor.checkpoint.source import resolve_model_source

    own = resolve_model_source(cfg.model.init_from).tokenizer_dir()
    return str(own) if own is not None else None


# ---- tokenizer ------------------------------------------------------------------------------------

def _check_tokenizer_path(cfg: Config) -> None:
    path = cfg.tokenizer.path
    if not path:
        return
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"tokenizer.path={path} does not exist; pass a tokenizer directory (with tokenizer.json) "
                          "or leave it unset to use model.init_from's own")
    if p.is_dir() and not ((p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file()):
        raise ConfigError(f"tokenizer.path={path} holds no tokenizer.json; pass the directory a Hugging Face "
                          "tokenizer was saved to (save_pretrained) or its tokenizer.json")
    try:
        from megakor.tokenizer import load_tokenizer

        load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise many types for a bad file
        raise ConfigError(f"tokenizer.path={path} does not load as a Hugging Face tokenizer "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); re-save it with "
                          "save_pretrained") from None


def _check_vocabulary(cfg: Config, args) -> None:
    tok = tokenizer_dir(cfg)
    if tok is None:
        return
    from megakor.train.engine import vocab_of

    n = vocab_of(tok)
    if n > args.vocab_size:
        which = f"tokenizer.path={tok}" if cfg.tokenizer.path else f"model.init_from's own tokenizer ({tok})"
        raise ConfigError(f"{which} has {n} tokens but model.init_from={cfg.model.init_from} has {args.vocab_size} "
                          "embedding rows; use the tokenizer the model was trained with, or grow the embeddings to it "
                          "(launch/convert.py --model DIR --tokenizer TOKENIZER)")


# ---- data -----------------------------------------------------------------------------------------

def _check_data(cfg: Config, args, world_size: int = 1) -> bool:
    """Every data entry well formed, names unique, each source readable; returns whether any is raw."""
    from megakor.data.blend import SourceSpec
    from megakor.data.sources import TEXT_UNITS

    if not cfg.data.sources:
        raise ConfigError("data.sources is empty; list at least one {path: ..., weight: ...} entry "
                          "(a preprocessed prefix or raw files)")
    specs: dict[str, list] = {}
    for section, entries in (("data.sources", cfg.data.sources), ("data.eval", cfg.data.eval)):
        specs[section] = []
        for i, entry in enumerate(entries):
            try:
                spec = SourceSpec.from_dict(entry)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{section}[{i}]: {e}") from None
            if spec.text_unit not in TEXT_UNITS:
                raise ConfigError(f"{section}[{i}] ({spec.name}): text_unit={spec.text_unit!r} is not valid; use one "
                                  f"of {', '.join(TEXT_UNITS)}")
            if not isinstance(spec.text_field, str):
                raise ConfigError(f"{section}[{i}] ({spec.name}): text_field={spec.text_field!r} must be a column or "
                                  "JSON key name")
            specs[section].append(spec)
        names = [s.name for s in specs[section]]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{section} has several sources named {dupes[0]!r}; give each entry a distinct 'name'")
    held_out = {s.name for s in specs["data.sources"] if s.holdout_documents}
    for s in specs["data.eval"]:
        if s.name in held_out:
            raise ConfigError(f"data.eval source {s.name!r} has the name of a data.sources entry with "
                              "holdout_documents, whose held-out split is reported under that name; rename one")
    raw = False
    for section, group in specs.items():
        for spec in group:
            raw |= _check_source(cfg, section, spec, args, world_size)
    return raw


def _check_source(cfg: Config, section: str, spec, args, world_size: int = 1) -> bool:
    """One source readable; returns whether it is raw files (to be preprocessed into data.cache_dir)."""
    from megakor.data.indexed import IndexedDataset, is_indexed_prefix
    from megakor.data.sources import expand_inputs

    what = f"{section} entry {spec.name}"
    prefix = spec.path[:-4] if isinstance(spec.path, str) and spec.path.endswith((".bin", ".idx")) else spec.path
    if isinstance(prefix, str) and is_indexed_prefix(prefix):
        try:
            docs = IndexedDataset(prefix)
        except Exception as e:  # noqa: BLE001 - a truncated .idx fails in numpy
            raise ConfigError(f"{what}: {prefix}.idx/.bin are unreadable ({e}); preprocess the source again") from None
        if docs.vocab_size > args.vocab_size:
            raise ConfigError(
                f"{what} was tokenised with a vocabulary of {docs.vocab_size} tokens but the model "
                f"has {args.vocab_size}; preprocess it with the model's tokenizer or resize the embeddings first")
        if len(docs) == 0:
            raise ConfigError(f"{what} ({prefix}) holds no documents; see the skipped counts in {prefix}.json and "
                              "preprocess a source with text")
        if spec.holdout_documents >= len(docs):
            raise ConfigError(f"{what} has {len(docs)} documents; holdout_documents={spec.holdout_documents} must be "
                              "smaller")
        return False
    try:
        inputs, unsupported = expand_inputs(spec.path)
    except FileNotFoundError as e:
        raise ConfigError(f"{what}: {e}") from None
    if not inputs:
        found = ", ".join(unsupported[:2]) or "it is empty"
        raise ConfigError(f"{what} ({spec.path}) holds no file megakor reads ({found}); give .jsonl, .json, .txt "
                          "or .parquet files (optionally .gz or .zst) or a preprocessed prefix")
    if tokenizer_dir(cfg) is None:
        raise ConfigError(f"{what} ({spec.path}) is not a preprocessed prefix, and there is no tokenizer to "
                          "preprocess it with; set tokenizer.path or preprocess it first")
    _check_inline_size(cfg, what, spec, inputs, world_size)
    problem = _first_document(inputs, spec)
    if problem is not None:
        fields = "the messages or prompt/response fields" if spec.format == "chat" else "text_field and text_unit"
        raise ConfigError(f"{what} ({spec.path}) holds no readable document ({problem}); check the files and "
                          f"{fields}")
    return True


def _input_bytes(inputs: list[str]) -> int:
    total = 0
    for path in inputs:
        if os.path.isdir(path):  # a saved dataset
            total += sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names)
        else:
            total += os.path.getsize(path)
    return total


def _check_inline_size(cfg: Config, what: str, spec, inputs: list[str], world_size: int) -> None:
    """A multi-process job does not preprocess a big raw source on first use: every GPU would wait."""
    limit = cfg.data.max_inline_preprocess_bytes
    if world_size <= 1 or not limit:
        return
    size = _input_bytes(inputs)
    if size <= limit:
        return
    from megakor.data.blend import cache_prefix
    from megakor.data.indexed import is_indexed_prefix

    prefix = cache_prefix(spec, tokenizer_dir(cfg), cfg.data.cache_dir)
    if is_indexed_prefix(prefix) and os.path.exists(prefix + ".json"):
        return  # preprocessed into data.cache_dir already: nothing to do at start-up
    too_big = (f"{what} ({spec.path}) is {_human_bytes(size)} of raw files, more than data.max_inline_preprocess_bytes="
               f"{limit} that a {world_size}-process job preprocesses while its GPUs wait")
    if spec.format == "chat":  # task examples: the array job reads text documents only
        raise ConfigError(f"{too_big}; run this source once in a 1-process job (it preprocesses into "
                          "data.cache_dir, which later jobs reuse) or raise data.max_inline_preprocess_bytes")
    raise ConfigError(
        f"{too_big}; preprocess it first with `sbatch --array=0-N slurm/preprocess.sh --input {_shell_paths(spec.path)} "
        f"--tokenizer {tokenizer_dir(cfg)}{_preprocess_flags(spec)} --output-prefix PREFIX` and give PREFIX as its path "
        "(or raise data.max_inline_preprocess_bytes)")


def _preprocess_flags(spec) -> str:
    """launch/preprocess.py's options that reproduce a source's reading, cleaning and dedup settings."""
    import shlex

    flags = []
    if spec.text_field != "text":
        flags += ["--text-field", spec.text_field]
    if spec.text_unit != "blank_line":
        flags += ["--text-unit", spec.text_unit]
    if not spec.clean:
        flags.append("--no-clean")
    else:
        ratio = spec.clean_config().min_hangul_ratio
        if ratio != 0.2:
            flags += ["--min-hangul-ratio", str(ratio)]
        if not spec.dedup:
            flags.append("--no-dedup")
        elif spec.near_dup_threshold != 0.8:
            flags += ["--near-dup-threshold", str(spec.near_dup_threshold)]
    return "".join(" " + shlex.quote(f) for f in flags)


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _shell_paths(path) -> str:
    import shlex

    return " ".join(shlex.quote(p) for p in (path if isinstance(path, list) else [path]))


def _first_document(inputs: list[str], spec) -> str | None:
    """None once a document with text is found, else the first problem seen."""
    from megakor.data.sources import plan_pieces, read_piece

    import json

    from megakor.data.chat import BadExample, messages_of

    chat = spec.format == "chat"  # task examples: whole JSON records, checked as chat messages
    first_problem, seen = None, 0
    for path in inputs:
        try:
            pieces = plan_pieces([path], 1 << 62, spec.text_unit, spec.split)
            for piece in pieces:
                for record in read_piece(piece, None if chat else spec.text_field, spec.text_unit, split=spec.split):
                    seen += 1
                    if chat and record.text:
                        try:
                            messages_of(json.loads(record.text))
                            return None
                        except (BadExample, ValueError) as e:
                            reason = getattr(e, "reason", "malformed_json")
                            first_problem = first_problem or f"{Path(path).name} line {record.line}: {reason} {e}"
                            continue
                    if record.text and record.text.strip():
                        return None
                    if record.reason and first_problem is None:
                        first_problem = f"{Path(path).name} line {record.line}: {record.reason} {record.detail}".strip()
                    if seen >= _MAX_RECORDS_PROBED:
                        return first_problem or f"the first {seen} records are empty"
        except Exception as e:  # noqa: BLE001 - a corrupt parquet/zstd file raises its own types
            first_problem = first_problem or f"{Path(path).name}: {type(e).__name__}: {e}"
    return first_problem or "every file is empty"


# ---- outputs --------------------------------------------------------------------------------------

def _check_writable_dir(key: str, path: str) -> Path:
    """The nearest existing directory at or above `path`, after checking a file can be created there."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a directory; point {key} at a directory")
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {existing} is a file; point {key} elsewhere")
    try:  # os.access says yes to root even on a read-only filesystem: try it
        with tempfile.TemporaryFile(dir=existing, prefix=".megakor-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}={path} is not writable ({existing}: {e.strerror}); point {key} at a directory "
                          "this user can write") from None
    return existing


def export_bytes(cfg: Config, args, device_type: str | None = None) -> int:
    """About how many bytes the model's weights take on disk in the training dtype on `device_type`
    (default: cuda where there is one): a checkpoint's model file, or its HF export."""
    from megakor.train.engine import train_dtype

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return args.num_parameters() * (2 if train_dtype(cfg, device_type) == torch.bfloat16 else 4)


def checkpoint_bytes(cfg: Config, args, device_type: str | None = None) -> int:
    """About how many bytes one checkpoint of this run takes on disk: the fp32 master weights and two
    AdamW moments of every trainable parameter (ZeRO partitions, 12 bytes each) plus the model export
    in the training dtype."""
    trainable = args.num_parameters() if cfg.train.freeze == "none" else args.vocab_size * args.hidden_size * (
        1 if args.tie_word_embeddings else 2)
    return 12 * trainable + export_bytes(cfg, args, device_type)


def _check_outputs(cfg: Config, args, raw_sources: bool) -> None:
    where = _check_writable_dir("checkpoint.dir", cfg.checkpoint.dir)
    need, free = checkpoint_bytes(cfg, args), shutil.disk_usage(where).free
    if need > free:
        raise ConfigError(f"checkpoint.dir={cfg.checkpoint.dir} has {free / 1e9:.1f} GB free but one checkpoint of "
                          f"this model takes about {need / 1e9:.1f} GB; free space or point checkpoint.dir elsewhere")
    if cfg.logging.tensorboard_dir:
        _check_writable_dir("logging.tensorboard_dir", cfg.logging.tensorboard_dir)
    if raw_sources:
        _check_writable_dir("data.cache_dir", cfg.data.cache_dir)


def launch_rank(environ=os.environ) -> int:
    """This process's global rank as the launcher set it, before any process group exists."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if environ.get(key):
            return int(environ[key])
    return 0
