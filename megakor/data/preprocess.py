"""Raw corpora -> indexed memory-mapped token dataset (`P.bin`, `P.idx`), in parallel and resumably.

1. Plan: expand the inputs, cut them into pieces (`sources.plan_pieces`) and group the pieces into
   shards of a few tens of MB; the plan is saved in `P.shards/plan.json`.
2. Workers (spawned processes) read, clean and tokenise one shard each into `P.shards/NNNNN.*`.
   A shard's `NNNNN.json` is written last, so a crash leaves it absent and only that shard is redone.
3. Merge (main process): walk the shards in input order, drop exact and near duplicates, append the
   kept documents to `P.bin`/`P.idx`, write every skipped record with its file and line to
   `P.skipped.log` and the totals to `P.json` (and `--report`).

Every document is stored as `tokenizer(text).input_ids + [eos]`. Task data (`format="chat"`, see
`megakor.data.chat`) is read record by record from JSON/JSONL, rendered with the tokenizer's chat
template and stored as `ids + [eos]` with a loss mask (`P.mask`); cleaning and dedup are off for it,
since they would change or drop pairs, and every record that is not an example is counted. The backend `tokenizers.Tokenizer`
of the loaded tokenizer does the encoding in the workers (checked against `tokenizer(text)` on
probe strings first), which avoids importing transformers in every worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megakor.data.clean import CleanConfig, Cleaner
from megakor.data.dedup import Deduplicator, MinHasher, exact_key
from megakor.data.indexed import IndexedWriter, dtype_for_vocab, is_indexed_prefix
from megakor.data.sources import Piece, expand_inputs, line_offsets, plan_pieces, read_piece

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Reasons that mean the input itself is broken (as opposed to filtered or duplicated).
BAD_INPUT_REASONS = ("malformed_json", "invalid_utf8", "missing_field", "not_text", "too_long", "truncated_file", "corrupt_file")
_PROBES = ["안녕하세요, 세계!  한국어 문장입니다.", "Hello world\n\n  spaces\tand tabs", "ㄱㅏ 한글 1234 …", "x"]


@dataclass
class PreprocessOptions:
    """How raw text becomes documents. `clean=None` means --no-clean: text is tokenised as read,
    without cleaning, filters or dedup (bad records are still counted and skipped)."""

    text_field: str = "text"  # JSON key / parquet or dataset column holding the document text
    text_unit: str = "blank_line"  # plain text: one document per "blank_line"-separated block, "line" or "file"
    split: str = "train"  # split of a saved DatasetDict
    clean: CleanConfig | None = field(default_factory=CleanConfig)
    exact_dedup: bool = True  # drop documents whose normalised text was seen before in this source
    near_dedup: bool = True  # drop documents whose MinHash Jaccard estimate with a kept one >= threshold
    near_dup_threshold: float = 0.8
    num_perm: int = 64  # MinHash permutations
    max_document_bytes: int = 8 << 20  # larger documents are skipped as "too_long" (bytes of UTF-8)
    shard_bytes: int | None = None  # input bytes per shard; None picks from the total and workers
    fast_tokenizer: bool = True  # encode byte-level BPE with tiktoken where it gives identical ids
    format: str = "text"  # "text": documents of text_field; "chat": task examples (messages or prompt/response)

    def __post_init__(self):
        if self.format not in ("text", "chat"):
            raise ValueError(f"format={self.format!r} is not a data format; use text or chat")
        if self.format == "chat":  # cleaning would change a pair's meaning, dedup would drop examples
            self.clean, self.exact_dedup, self.near_dedup = None, False, False

    def fingerprint_dict(self) -> dict:
        d = asdict(self)
        d.pop("shard_bytes")  # neither changes the output
        d.pop("fast_tokenizer")
        if d["format"] == "text":  # fingerprints of text sources stay what they were before task data
            d.pop("format")
        return d



# ---------------------------------------------------------------------------------------------
# Fast path: byte-level BPE tokenizers (Llama 3 and other tiktoken-converted vocabularies) encode
# about 2.5x faster with tiktoken than with `tokenizers`, with the same ids. It is used only when
# the two are equivalent by construction (checked in `fast_path_supported`), only for documents
# that contain no added-token text (which `tokenizers` splits out first), and every 64th document
# is re-encoded with `tokenizers` anyway: a mismatch redoes the shard without the fast path.


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split_pattern(spec: dict) -> str | None:
    """The regex of a `Sequence[Split(regex, Isolated), ByteLevel(no regex, no prefix space)]`
    pre-tokenizer without a normalizer, the only shape tiktoken reproduces; else None."""
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in split.get("pattern", {})):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("add_prefix_space") or byte_level.get("use_regex"):
        return None
    if (model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or model.get("byte_fallback") or not model.get("ignore_merges")):
        return None
    return split["pattern"]["Regex"]


def fast_path_supported(tokenizer_json: str) -> bool:
    """True when tiktoken's rank-based BPE gives exactly the merges of this tokenizer: the merges list
    holds every split (a, b) of every token into two tokens, ordered by the rank (id) of a + b."""
    import importlib.util

    if importlib.util.find_spec("tiktoken") is None:  # optional: without it the tokenizers library does all
        return False
    spec = json.loads(tokenizer_json)
    if _split_pattern(spec) is None:
        return False
    vocab = spec["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    merge_set = set(merges)
    last = -1
    for a, b in merges:
        rank = vocab.get(a + b)
        if rank is None or rank < last:
            return False
        last = rank
    for token in vocab:
        for k in range(1, len(token)):
            if token[:k] in vocab and token[k:] in vocab and (token[:k], token[k:]) not in merge_set:
                return False
    return True


class _FastEncoder:
    """tiktoken encoding of a byte-level BPE tokenizer, with the special tokens its post-processor
    adds around every document."""

    def __init__(self, tokenizer_json: str, hf_tokenizer):
        import re

        import tiktoken

        spec = json.loads(tokenizer_json)
        u2b = {c: b for b, c in _bytes_to_unicode().items()}
        added = {t["content"] for t in spec.get("added_tokens", [])}
        ranks = {bytes(u2b[c] for c in tok): i for tok, i in spec["model"]["vocab"].items() if tok not in added}
        self.encoding = tiktoken.Encoding("megakor", pat_str=_split_pattern(spec), mergeable_ranks=ranks, special_tokens={})
        self.added = re.compile("|".join(re.escape(a) for a in sorted(added, key=len, reverse=True))) if added else None
        self.added_first = {a[0] for a in added if a}
        full = hf_tokenizer.encode("a").ids
        core = hf_tokenizer.encode("a", add_special_tokens=False).ids
        k = next((i for i in range(len(full) - len(core) + 1) if full[i : i + len(core)] == core), None)
        if k is None:
            raise ValueError("post-processor reorders tokens")
        self.prefix, self.suffix = full[:k], full[k + len(core):]

    def usable(self, text: str) -> bool:
        return self.added is None or not (any(c in text for c in self.added_first) and self.added.search(text))

    def encode(self, text: str) -> list[int]:
        return self.prefix + self.encoding.encode_ordinary(text) + self.suffix


class _FastPathMismatch(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Worker side


class _Worker:
    def __init__(self, tokenizer_json: str, eos_id: int, vocab_size: int, options: PreprocessOptions, progress_queue=None,
                 fast_path: bool = False, tokenizer_path: str | None = None):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.chat_tokenizer = None
        if options.format == "chat":  # chat templates need transformers' tokenizer (jinja rendering)
            from megakor.tokenizer import load_tokenizer

            self.chat_tokenizer = load_tokenizer(tokenizer_path)
        self.encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        self.fast = _FastEncoder(tokenizer_json, self.tokenizer) if fast_path else None
        self.eos_id = eos_id
        self.dtype = dtype_for_vocab(vocab_size)
        self.options = options
        self.dedup = options.clean is not None and (options.exact_dedup or options.near_dedup)
        self.minhasher = MinHasher(options.num_perm) if options.clean is not None and options.near_dedup else None
        self.progress_queue = progress_queue

    def run(self, shard_id: int, pieces: list[tuple[int, Piece]], work_dir: str) -> dict:
        if self.fast is not None:
            try:
                return self._run(shard_id, pieces, work_dir, self.fast)
            except _FastPathMismatch as e:
                log.warning("shard %d: %s; redoing it with the tokenizers library", shard_id, e)
        return self._run(shard_id, pieces, work_dir, None)

    def _encode(self, texts: list[str], fast: _FastEncoder | None, first_doc: int) -> list[list[int]]:
        if fast is None:
            return [e.ids for e in self.encode(texts)]
        out = [fast.encode(t) if fast.usable(t) else None for t in texts]
        slow = [i for i, ids in enumerate(out) if ids is None or (first_doc + i) % 64 == 0]
        if slow:
            for i, enc in zip(slow, self.encode([texts[i] for i in slow])):
                if out[i] is not None and out[i] != enc.ids:
                    raise _FastPathMismatch(f"tiktoken and tokenizers disagree on document {first_doc + i}")
                out[i] = enc.ids
        return out

    def _run(self, shard_id: int, pieces: list[tuple[int, Piece]], work_dir: str, fast: _FastEncoder | None) -> dict:
        o = self.options
        cleaner = Cleaner(o.clean) if o.clean is not None else None
        base = os.path.join(work_dir, f"{shard_id:05d}")
        skips: list[list] = []
        meta = {"length": [], "piece": [], "line": [], "chars": [], "key": [], "sig": []}
        masks: list[np.ndarray] = []  # format "chat": the loss mask of every document
        records = 0
        piece_lines: dict[int, int] = {}
        last_report, pending = time.monotonic(), [0, 0, 0]  # bytes, documents, tokens not yet reported
        with open(base + ".bin.tmp", "wb") as out:
            batch: list[tuple[str, int, int]] = []

            def flush():
                if not batch:
                    return
                encodings = self._encode([t for t, _, _ in batch], fast, len(meta["length"]))
                ids: list[int] = []
                for (text, piece_idx, line), doc in zip(batch, encodings):
                    ids.extend(doc)
                    ids.append(self.eos_id)
                    meta["length"].append(len(doc) + 1)
                    meta["piece"].append(piece_idx)
                    meta["line"].append(line)
                    meta["chars"].append(len(text))
                    if self.dedup:
                        meta["key"].append(exact_key(text) if o.exact_dedup else 0)
                    if self.minhasher is not None:
                        meta["sig"].append(self.minhasher.signature(text))
                out.write(np.asarray(ids, dtype=self.dtype).tobytes())
                pending[1] += len(batch)
                pending[2] += len(ids)
                batch.clear()

            for piece_idx, piece in pieces:
                counter: dict = {}
                batch_chars = 0
                text_field = None if self.chat_tokenizer is not None else o.text_field  # None: the whole record
                for rec in read_piece(piece, text_field, o.text_unit, o.max_document_bytes, o.split, counter):
                    records += 1
                    if rec.text is None:
                        skips.append([rec.reason, piece_idx, rec.line, rec.detail[:300]])
                        continue
                    text = rec.text
                    if self.chat_tokenizer is not None:
                        self._add_example(text, piece_idx, rec.line, out, meta, masks, skips, pending)
                        continue
                    if cleaner is not None:
                        text, reason = cleaner(text)
                        if reason is not None:
                            skips.append([reason, piece_idx, rec.line, ""])
                            continue
                    batch.append((text, piece_idx, rec.line))
                    batch_chars += len(text)
                    if len(batch) >= 512 or batch_chars >= (1 << 20):
                        flush()
                        batch_chars = 0
                        if self.progress_queue is not None and time.monotonic() - last_report > 0.5:
                            self.progress_queue.put((0, pending[1], pending[2]))
                            pending[1] = pending[2] = 0
                            last_report = time.monotonic()
                flush()
                piece_lines[piece_idx] = counter.get("lines", 0)
                pending[0] += piece.size
                if self.progress_queue is not None:
                    self.progress_queue.put(tuple(pending))
                    pending[:] = [0, 0, 0]
        # Data files first, the .json marker last: its presence means the shard is complete.
        arrays = {k: np.asarray(meta[k], dtype=dt) for k, dt in (("length", np.int64), ("piece", np.int32), ("line", np.int64), ("chars", np.int64), ("key", np.uint64))}
        arrays["sig"] = np.asarray(meta["sig"], dtype=np.uint64).reshape(len(meta["sig"]), o.num_perm) if meta["sig"] else np.zeros((0, o.num_perm), np.uint64)
        if self.chat_tokenizer is not None:
            arrays["mask"] = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
        np.savez(base + ".meta.tmp.npz", **arrays)
        os.replace(base + ".bin.tmp", base + ".bin")
        os.replace(base + ".meta.tmp.npz", base + ".meta.npz")
        summary = {
            "shard": shard_id,
            "records": records,
            "documents": len(meta["length"]),
            "tokens": int(arrays["length"].sum()),
            "skips": skips,
            "piece_lines": {str(k): v for k, v in piece_lines.items()},
            "cleaning": dict(cleaner.counts) if cleaner is not None else {},
        }
        with open(base + ".json.tmp", "w") as f:
            json.dump(summary, f)
        os.replace(base + ".json.tmp", base + ".json")
        return summary


    def _add_example(self, text, piece_idx, line, out, meta, masks, skips, pending):
        """One chat record → ids + [eos] and its loss mask (the EOS after the template's own end is not trained)."""
        from megakor.data.chat import BadExample, encode_record_line

        try:
            ids, mask = encode_record_line(self.chat_tokenizer, text)
        except BadExample as e:
            skips.append([e.reason, piece_idx, line, str(e)[:300]])
            return
        out.write(np.asarray(ids + [self.eos_id], dtype=self.dtype).tobytes())
        masks.append(np.append(mask, np.uint8(0)))
        meta["length"].append(len(ids) + 1)
        meta["piece"].append(piece_idx)
        meta["line"].append(line)
        meta["chars"].append(len(text))
        pending[1] += 1
        pending[2] += len(ids) + 1


_worker: _Worker | None = None


def _init_worker(tokenizer_json, eos_id, vocab_size, options, queue, fast_path=False, tokenizer_path=None):
    # One process per core is our parallelism; the Rust thread pool on top would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker
    _worker = _Worker(tokenizer_json, eos_id, vocab_size, options, queue, fast_path, tokenizer_path)


def _run_shard(args):
    shard_id, pieces, work_dir = args
    return _worker.run(shard_id, pieces, work_dir)


# ---------------------------------------------------------------------------------------------
# Main side


def _tokenizer_backend(tokenizer_path):
    from megakor.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer_path} defines no EOS token; set eos_token in its tokenizer_config.json")
    backend = tok.backend_tokenizer
    for probe in _PROBES:
        if backend.encode(probe).ids != tok(probe).input_ids:
            raise RuntimeError(
                f"tokenizer {tokenizer_path}: its backend encodes {probe!r} differently from tokenizer(text); "
                "this tokenizer needs Python-side processing that preprocessing does not replicate"
            )
    return backend.to_str(), int(tok.eos_token_id), len(tok)


def _fingerprint(inputs: list[str], tokenizer_json: str, eos_id: int, options: PreprocessOptions) -> str:
    files = []
    for p in inputs:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                for n in sorted(names):
                    st = os.stat(os.path.join(root, n))
                    files.append([os.path.join(root, n), st.st_size, st.st_mtime_ns])
        else:
            st = os.stat(p)
            files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {"version": FORMAT_VERSION, "files": files, "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
         "eos": eos_id, "options": options.fingerprint_dict()},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_work_units(files: list[str], options: PreprocessOptions, processes: int) -> dict:
    """{"pieces": [...], "shards": [[piece index, ...], ...]}: the inputs cut into pieces, grouped into work
    units of about `options.shard_bytes` (default: total / (4 x processes), 1-128 MB). Deterministic for the
    same files and arguments, so every task of an array job computes the same plan."""
    total = sum(os.path.getsize(p) if os.path.isfile(p) else 0 for p in files)
    shard_bytes = options.shard_bytes or int(min(128 << 20, max(1 << 20, total // max(4 * max(processes, 1), 1))))
    pieces = plan_pieces(files, shard_bytes, options.text_unit, options.split)
    return {"pieces": [p.to_dict() for p in pieces], "shards": _group_shards(pieces, shard_bytes)}


def _group_shards(pieces: list[Piece], shard_bytes: int) -> list[list[int]]:
    shards, current, size = [], [], 0
    for i, p in enumerate(pieces):
        current.append(i)
        size += p.size
        if size >= shard_bytes:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def preprocess(
    inputs: list[str] | str,
    tokenizer_path: str,
    output_prefix: str,
    workers: int = 2,
    options: PreprocessOptions | None = None,
    report_path: str | None = None,
    progress: bool = True,
    keep_shards: bool = False,
) -> dict:
    """Tokenise `inputs` into `output_prefix.bin/.idx`; returns the report (also in `output_prefix.json`).
    `workers=0` runs in this process (tests, debugging). Re-running after a crash redoes only the
    shards that had not finished; re-running after success returns the stored report."""
    options = options or PreprocessOptions()
    t0 = time.time()
    files, unsupported = expand_inputs(inputs)
    tokenizer_json, eos_id, vocab_size = _tokenizer_backend(tokenizer_path)
    fingerprint = _fingerprint(files, tokenizer_json, eos_id, options)
    prefix = str(output_prefix)
    if is_indexed_prefix(prefix) and os.path.exists(prefix + ".json"):
        with open(prefix + ".json") as f:
            done = json.load(f)
        if done.get("fingerprint") == fingerprint:
            log.info("%s is already preprocessed from these inputs; reusing it", prefix)
            _write_report(done, report_path)
            return done

    work_dir = prefix + ".shards"
    plan_file = os.path.join(work_dir, "plan.json")
    plan = None
    if os.path.exists(plan_file):
        with open(plan_file) as f:
            plan = json.load(f)
        if plan.get("fingerprint") != fingerprint:
            log.warning("%s holds shards of different inputs or options; starting over", work_dir)
            shutil.rmtree(work_dir)
            plan = None
    if plan is None:
        plan = {"fingerprint": fingerprint, **plan_work_units(files, options, max(workers, 1))}
        os.makedirs(work_dir, exist_ok=True)
        with open(plan_file + ".tmp", "w") as f:
            json.dump(plan, f)
        os.replace(plan_file + ".tmp", plan_file)
    pieces = [Piece.from_dict(d) for d in plan["pieces"]]
    shards = plan["shards"]
    done_ids = {i for i in range(len(shards)) if os.path.exists(os.path.join(work_dir, f"{i:05d}.json"))}
    todo = [(i, [(j, pieces[j]) for j in shards[i]], work_dir) for i in range(len(shards)) if i not in done_ids]
    if done_ids:
        log.info("resuming: %d of %d shards already done", len(done_ids), len(shards))
    fast = bool(todo) and options.fast_tokenizer and options.format == "text" and fast_path_supported(tokenizer_json)
    _run_shards(todo, tokenizer_json, eos_id, vocab_size, options, workers, progress, fast, str(tokenizer_path),
                total_bytes=sum(p.size for p in pieces), done_bytes=sum(pieces[j].size for i in done_ids for j in shards[i]))
    unit_bases = [os.path.join(work_dir, f"{i:05d}") for i in range(len(shards))]
    report, _ = merge_units(prefix, unit_bases, pieces, options, vocab_size, eos_id)
    report.update(
        fingerprint=fingerprint, tokenizer=str(tokenizer_path), eos_id=eos_id, vocab_size=vocab_size,
        dtype=str(dtype_for_vocab(vocab_size)), inputs=len(files), unsupported_files=unsupported,
        shards={"total": len(shards), "reused": len(done_ids), "processed": len(todo)},
        tokenizer_engine="tiktoken" if fast else "tokenizers",
        seconds=round(time.time() - t0, 3),
    )
    report["tokens_per_sec"] = round(report["tokens"] / max(report["seconds"], 1e-9), 1)
    report["documents_per_sec"] = round(report["documents"] / max(report["seconds"], 1e-9), 1)
    report["peak_rss_mb"] = peak_rss_mb()
    for path in unsupported:
        log.warning("skipped %s: not a file type preprocessing reads (jsonl/json/parquet/txt, .gz/.zst)", path)
    with open(prefix + ".json.tmp", "w") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    os.replace(prefix + ".json.tmp", prefix + ".json")
    _write_report(report, report_path)
    if not keep_shards:
        shutil.rmtree(work_dir)
    return report


def _write_report(report: dict, report_path: str | None) -> None:
    if report_path:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)


class ProgressLines:
    """Progress as one log line every `every` seconds, for logs that are files (a Slurm job's output),
    where a redrawn bar would be thousands of carriage returns."""

    def __init__(self, total: int, initial: int, desc: str, every: float):
        self.total, self.done, self.desc, self.every = total, initial, desc, every
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.emit()

    def emit(self) -> None:
        elapsed = time.monotonic() - self.start
        fraction = self.done / max(self.total, 1)
        log.info("%s: %5.1f%% of %.1f MB read, %s, %.0f s elapsed", self.desc, 100 * fraction, self.total / 1e6,
                 self.postfix or "starting", elapsed)

    def close(self) -> None:
        self.emit()


def _run_shards(todo, tokenizer_json, eos_id, vocab_size, options, workers, progress, fast, tokenizer_path, total_bytes,
                done_bytes, desc="preprocess"):
    if not todo:
        return
    import sys

    from tqdm import tqdm

    if progress and not sys.stderr.isatty():
        bar = ProgressLines(total_bytes, done_bytes, desc, float(os.environ.get("MEGAKOR_PROGRESS_SECONDS", "30")))
    else:
        bar = tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc=desc, disable=not progress)
    start, docs, tokens = time.monotonic(), 0, 0

    def advance(nbytes, ndocs, ntokens):
        nonlocal docs, tokens
        docs += ndocs
        tokens += ntokens
        elapsed = max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"{docs:,} docs, {tokens:,} tokens, {docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s",
                            refresh=False)
        bar.update(nbytes)

    try:
        if workers <= 0:
            queue = _ListQueue()
            _init_worker(tokenizer_json, eos_id, vocab_size, options, queue, fast, tokenizer_path)
            for job in todo:
                _run_shard(job)
                for item in queue.drain():
                    advance(*item)
            return
        ctx = mp.get_context("spawn")  # fork after the Rust tokenizer ran in this process can deadlock
        queue = ctx.Queue()
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker,
                      initargs=(tokenizer_json, eos_id, vocab_size, options, queue, fast, tokenizer_path)) as pool:
            results = pool.imap_unordered(_run_shard, todo)
            finished = 0
            while finished < len(todo):
                try:
                    results.next(timeout=0.2)
                    finished += 1
                except mp.TimeoutError:
                    pass
                while not queue.empty():
                    advance(*queue.get())
            while not queue.empty():
                advance(*queue.get())
    finally:
        bar.close()


class _ListQueue:
    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)

    def drain(self):
        items, self.items = self.items, []
        return items


def peak_rss_mb() -> dict:
    """Peak resident memory (MB) of this process and of the largest of its finished child processes
    (the tokenising workers)."""
    import resource

    return {"main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def merge_units(prefix, unit_bases: list[str], pieces, options, vocab_size, eos_id,
                candidates: np.ndarray | None = None) -> tuple[dict, list[Counter]]:
    """Concatenate the work units (`unit_bases[i]` + .bin/.meta.npz/.json) in input order, dropping
    duplicates, and account for every record; returns the report and the skip counts of each unit.
    `candidates` (one bool per document of all units, in order) limits the duplicate checks to the
    documents that share an exact key or an LSH band with another one (`megakor.data.sharded`): the
    others cannot be duplicates nor have any, so the result is the same and memory holds only them."""
    summaries = []
    for base in unit_bases:
        with open(base + ".json") as f:
            summaries.append(json.load(f))
    line_offset = line_offsets(pieces, {int(k): v for s in summaries for k, v in s["piece_lines"].items()})

    cleaning = options.clean is not None
    dedup = Deduplicator(options.exact_dedup, options.near_dedup, options.near_dup_threshold, options.num_perm) if cleaning and (
        options.exact_dedup or options.near_dedup) else None
    chat = options.format == "chat"
    writer = IndexedWriter(prefix, vocab_size, eos_id, with_mask=chat)
    skipped, cleaning_counts = Counter(), Counter()
    unit_skipped: list[Counter] = []
    records = documents = tokens = characters = 0
    log_path = prefix + ".skipped.log"
    shown = 0
    try:
        with open(log_path + ".tmp", "w") as slog:
            slog.write("reason\tfile:line\tdetail\n")

            def note(reason, piece_idx, line, detail):
                nonlocal shown
                where = f"{pieces[piece_idx].path}:{int(line) + line_offset[piece_idx]}"
                skipped[reason] += 1
                slog.write(f"{reason}\t{where}\t{detail}\n")
                if reason in BAD_INPUT_REASONS and shown < 20:  # filters and duplicates are routine: file only
                    shown += 1
                    log.warning("skipped %s (%s) %s", where, reason, detail)

            first_doc = 0
            for s, base in zip(summaries, unit_bases):
                before = skipped.copy()
                records += s["records"]
                cleaning_counts.update(s["cleaning"])
                for reason, piece_idx, line, detail in s["skips"]:
                    note(reason, piece_idx, line, detail)
                meta = np.load(base + ".meta.npz")
                lengths = meta["length"]
                keep = np.ones(len(lengths), dtype=bool)
                if dedup is not None:
                    keys, sigs = meta["key"], meta["sig"]
                    check = range(len(lengths)) if candidates is None else np.flatnonzero(
                        candidates[first_doc : first_doc + len(lengths)])
                    for d in check:
                        reason = dedup.check(int(keys[d]) if options.exact_dedup else None, sigs[d] if options.near_dedup else None)
                        if reason is not None:
                            keep[d] = False
                            note(reason, int(meta["piece"][d]), int(meta["line"][d]), "")
                first_doc += len(lengths)
                unit_skipped.append(skipped - before)
                shard_tokens = np.fromfile(base + ".bin", dtype=writer.dtype)
                if len(shard_tokens) != int(lengths.sum()):
                    raise RuntimeError(f"work unit {base}.bin is incomplete; delete it and its .json, then run again")
                if keep.all():  # the common case: no copy of the unit's tokens
                    writer.add_many(shard_tokens, lengths, meta["mask"] if chat else None)
                else:
                    kept = np.repeat(keep, lengths)
                    writer.add_many(shard_tokens[kept], lengths[keep], meta["mask"][kept] if chat else None)
                documents += int(keep.sum())
                tokens += int(lengths[keep].sum())
                characters += int(meta["chars"][keep].sum())
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    os.replace(log_path + ".tmp", log_path)
    if sum(skipped.values()):
        log.warning("skipped %d of %d records (%s); each is listed with file and line in %s",
                    sum(skipped.values()), records, dict(skipped), log_path)
    if records and skipped.get("missing_field", 0) > records // 2:
        log.warning("most records lack the field %r; set text_field to the key that holds the text", options.text_field)
    return {
        "output_prefix": prefix,
        "records": records,
        "documents": documents,
        "tokens": tokens,
        "characters": characters,
        "skipped": dict(sorted(skipped.items())),
        "cleaning": dict(sorted(cleaning_counts.items())),
        "dedup": {"exact_duplicate": skipped.get("exact_duplicate", 0), "near_duplicate": skipped.get("near_duplicate", 0)} if dedup else {},
        "skipped_log": log_path,
    }, unit_skipped
