"""Weighted blending, packing and exactly resumable batching of preprocessed sources.

Packing (Megatron-style, per source): each epoch the source's documents (`ids + [eos]`) are put in a
seeded random order and concatenated; the stream is cut into windows of T+1 tokens overlapping by
one (input = first T, labels = last T). The last window of an epoch is padded with EOS (label -100),
so every token of every document is an input exactly once per epoch; the padding is one segment of
its own (positions from 0, labels -100), so it costs a varlen kernel one document, not one per token.
Windows are then visited in a seeded random order.

Micro-batches carry their packing metadata (`collate`): `cu_seqlens` (int32 cumulative document
lengths over the flattened batch) and `max_seqlen` (the longest document, a host int), computed here
on the host so the model never asks the device where documents start.

Blending: global sample i is assigned to a source by blocks of `BLEND_BLOCK` samples. Up to block k,
source s has received floor(k * BLEND_BLOCK * w_s) samples (the heaviest source takes the rest), so
the proportions are exact at every block boundary; inside a block the assignment is a seeded
permutation. This is a closed form: any sample can be found without building the index for the
samples before it, and the mapping depends only on (weights, seed), never on the data-parallel layout.

Per-epoch orders (document permutation, cumulative lengths, window permutation) are built once per
(source, seq_len, seed, epoch) and cached as memory-mapped .npy files under `cache_dir/index/`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from megakor.data.clean import CleanConfig
from megakor.data.indexed import IndexedDataset, is_indexed_prefix
from megakor.data.preprocess import PreprocessOptions, preprocess
from megakor.data.sources import expand_inputs

log = logging.getLogger(__name__)

BLEND_BLOCK = 1024
IGNORE_INDEX = -100


@dataclass
class SourceSpec:
    """One entry of `data.sources` / `data.eval`: a preprocessed prefix or raw files, and how to read,
    clean and weight them."""

    path: str | list[str]  # prefix of P.bin/P.idx, or raw files / directories / globs
    weight: float = 1.0  # relative share of training samples (normalised over the sources)
    name: str | None = None  # label in logs and eval metrics; defaults to the file or directory name
    text_field: str = "text"  # JSON key / column with the text (raw sources)
    text_unit: str = "blank_line"  # plain text: one document per blank-line block, "line" or "file"
    split: str = "train"  # split of a saved DatasetDict
    lang: str = "ko"  # "ko" turns on the Hangul-ratio filter by default; anything else leaves it off
    min_hangul_ratio: float | None = None  # None: 0.2 for lang "ko", 0 (off) otherwise
    clean: bool = True  # False: tokenise text as read (no cleaning, filters or dedup)
    dedup: bool = True  # exact and near-duplicate removal within this source
    near_dup_threshold: float = 0.8  # MinHash Jaccard at or above which a document is a near duplicate
    cleaning: dict = field(default_factory=dict)  # overrides of CleanConfig fields, e.g. {min_chars: 50}
    holdout_documents: int = 0  # the last N documents become eval set "<name>" and are never trained on
    format: str = "text"  # "chat": task examples (messages or prompt/response), prompt-masked (megakor.data.chat)
    overlong: str = "truncate"  # format chat: an example longer than train.seq_len + 1 is truncated or dropped
    distill: bool = False  # replay scored against the starting model: KL(start ‖ model) on its tokens, not CE on its text

    def __post_init__(self):
        if isinstance(self.path, (list, tuple)):
            self.path = [str(p) for p in self.path]
            if not self.path:
                raise ValueError("a data source has an empty path list; give at least one file, directory or prefix")
        else:
            self.path = str(self.path)
        if not (isinstance(self.weight, (int, float)) and self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"data source {self.path} has weight {self.weight!r}; give a positive number")
        if self.name is None:
            first = self.path[0] if isinstance(self.path, list) else self.path
            clean_parts = []
            for part in Path(first).parts:  # "data/en/*.jsonl" is named "en", "ko.jsonl.zst" "ko"
                if any(c in part for c in "*?["):
                    break
                clean_parts.append(part)
            self.name = (clean_parts[-1].split(".")[0] if clean_parts else "") or "source"
        if not isinstance(self.holdout_documents, int) or self.holdout_documents < 0:
            raise ValueError(f"data source {self.name}: holdout_documents={self.holdout_documents!r}; give a count >= 0")
        if self.format not in ("text", "chat") or self.overlong not in ("truncate", "drop"):
            raise ValueError(f"data source {self.name}: format={self.format!r}, overlong={self.overlong!r}; "
                             "use format text or chat, overlong truncate or drop")
        if not isinstance(self.distill, bool):
            raise ValueError(f"data source {self.name}: distill={self.distill!r}; write true or false")
        self.clean_config()  # validates the overrides now, not after an hour of preprocessing

    @classmethod
    def from_dict(cls, d: dict) -> "SourceSpec":
        if isinstance(d, SourceSpec):
            return d
        if isinstance(d, str):
            return cls(path=d)
        if not isinstance(d, dict) or "path" not in d:
            raise ValueError(f"data source {d!r} needs a 'path' key (a prefix or raw files) and optionally 'weight'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"data source {d.get('path')}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    def clean_config(self) -> CleanConfig:
        ratio = self.min_hangul_ratio if self.min_hangul_ratio is not None else (0.2 if self.lang == "ko" else 0.0)
        return CleanConfig.from_dict({"min_hangul_ratio": ratio, **self.cleaning})

    def preprocess_options(self) -> PreprocessOptions:
        return PreprocessOptions(
            text_field=self.text_field, text_unit=self.text_unit, split=self.split,
            clean=self.clean_config() if self.clean else None,
            exact_dedup=self.dedup, near_dedup=self.dedup, near_dup_threshold=self.near_dup_threshold,
            format=self.format,
        )


# ---------------------------------------------------------------------------------------------
# Resolving a source to a preprocessed prefix


@contextmanager
def file_lock(path: str):
    """An exclusive lock held by one process (one rank) at a time; others block until it is released."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _strip_suffix(path: str) -> str:
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def cache_prefix(spec: SourceSpec, tokenizer_path: str, cache_dir: str) -> str:
    """Where raw source `spec` is (or will be) preprocessed to under `cache_dir`: named by the files
    (path, size, mtime), the tokenizer and the preprocessing options."""
    files, _ = expand_inputs(spec.path)
    stats = [[os.path.abspath(p), os.path.getsize(p) if os.path.isfile(p) else 0, os.stat(p).st_mtime_ns] for p in files]
    tok_file = Path(tokenizer_path) / "tokenizer.json" if Path(tokenizer_path).is_dir() else Path(tokenizer_path)
    tok_hash = hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.exists() else str(tokenizer_path)
    key = json.dumps({"files": stats, "tokenizer": tok_hash, "options": spec.preprocess_options().fingerprint_dict()}, sort_keys=True, default=str)
    return os.path.join(cache_dir, f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


def resolve_source(spec: SourceSpec, tokenizer_path: str | None, cache_dir: str | None, workers: int) -> str:
    """The prefix of `spec`'s preprocessed data, preprocessing raw files into `cache_dir` on first use.
    Concurrent ranks serialise on a lock file; all but the first find the result ready."""
    if isinstance(spec.path, str) and is_indexed_prefix(_strip_suffix(spec.path)):
        return _strip_suffix(spec.path)
    if cache_dir is None:
        raise ValueError(f"data source {spec.name} ({spec.path}) is raw files; set data.cache_dir so they can be preprocessed")
    if tokenizer_path is None:
        raise ValueError(f"data source {spec.name} is raw files; a tokenizer path is needed to preprocess it")
    prefix = cache_prefix(spec, tokenizer_path, cache_dir)
    if is_indexed_prefix(prefix) and os.path.exists(prefix + ".json"):
        return prefix
    with file_lock(prefix + ".lock"):
        if not (is_indexed_prefix(prefix) and os.path.exists(prefix + ".json")):
            log.info("preprocessing data source %s into %s", spec.name, prefix)
            preprocess(spec.path, tokenizer_path, prefix, workers=workers, options=spec.preprocess_options(), progress=True)
    return prefix


# ---------------------------------------------------------------------------------------------
# One source, packed


class PackedSource:
    """Windows of `seq_len + 1` tokens over one source. `shuffle=False` (eval) keeps documents and
    windows in order and has a single epoch; `shuffle=True` repeats epochs forever, each in its own
    seeded order."""

    def __init__(self, prefix: str, seq_len: int, seed: int = 0, name: str = "", shuffle: bool = True, cache_dir: str | None = None,
                 doc_range: tuple[int, int] | None = None):
        self.docs = IndexedDataset(prefix)
        # doc_range: only documents [first, last) of the prefix (a held-out tail, or all but it).
        self.first_doc, self.last_doc = doc_range or (0, len(self.docs))
        self.num_tokens = int(self.docs.offsets[self.last_doc] - self.docs.offsets[self.first_doc])
        if self.num_tokens == 0:
            raise ValueError(f"data source {name or prefix} holds no documents; see the skipped counts in {prefix}.json")
        if self.docs.eos_id < 0:
            raise ValueError(f"{prefix}.idx records no EOS id; preprocess it again with launch/preprocess.py")
        self.prefix, self.seq_len, self.seed, self.name, self.shuffle = prefix, seq_len, seed, name or Path(prefix).name, shuffle
        self.offsets = self.docs.offsets
        self.samples_per_epoch = -(-self.num_tokens // seq_len)  # ceil: the last window is padded
        self.cache_dir = cache_dir
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        """Windows in one epoch (the eval length; training wraps into further epochs)."""
        return self.samples_per_epoch

    def _epoch(self, epoch: int):
        if epoch in self._epochs:
            return self._epochs[epoch]
        a, b = self.first_doc, self.last_doc
        n = b - a
        if not self.shuffle:
            ends = np.asarray(self.offsets[a + 1 : b + 1]) - self.offsets[a]
            arrays = (np.arange(a, b, dtype=np.int64), np.arange(self.samples_per_epoch, dtype=np.int64), ends)
            self._remember(epoch, arrays)
            return arrays
        base = None
        if self.cache_dir is not None:
            tag = hashlib.sha256(f"{os.path.abspath(self.prefix)}|{self.num_tokens}|{a}|{b}|{self.seq_len}|{self.seed}".encode()).hexdigest()[:16]
            base = os.path.join(self.cache_dir, "index", f"{self.name}-{tag}-e{epoch}")
        if base is None or not os.path.exists(base + ".ends.npy"):
            name_key = int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:4], "little")
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, name_key, epoch])))
            order = a + rng.permutation(n).astype(np.int64)
            windows = rng.permutation(self.samples_per_epoch).astype(np.int64)
            ends = np.cumsum(np.diff(np.asarray(self.offsets[a : b + 1]))[order - a])
            if base is None:
                self._remember(epoch, (order, windows, ends))
                return self._epochs[epoch]
            # Every rank computes the same arrays; atomic renames make concurrent writers harmless,
            # and ".ends" lands last, so its presence means all three are there.
            os.makedirs(os.path.dirname(base), exist_ok=True)
            for part, arr in (("order", order), ("windows", windows), ("ends", ends)):
                tmp = f"{base}.{part}.{os.getpid()}.tmp.npy"
                np.save(tmp, arr)
                os.replace(tmp, f"{base}.{part}.npy")
        # Memory-mapped, so the ranks of a node share one copy in the page cache.
        arrays = tuple(np.load(f"{base}.{part}.npy", mmap_mode="r") for part in ("order", "windows", "ends"))
        self._remember(epoch, arrays)
        return arrays

    def _remember(self, epoch, arrays):
        if len(self._epochs) >= 2:  # a run touches at most two epochs of a source at a time
            self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = arrays

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens[T+1], starts[T+1], real[T+1]) of sample `index`: `starts` marks the first token
        of a document, `real` is False on end-of-epoch padding."""
        epoch, j = divmod(int(index), self.samples_per_epoch)
        if not self.shuffle and epoch:
            raise IndexError(f"eval sample {index} is past the end ({self.samples_per_epoch} samples)")
        order, windows, ends = self._epoch(epoch)
        T = self.seq_len
        pos = int(windows[j]) * T
        stop = min(pos + T + 1, self.num_tokens)
        tokens = np.full(T + 1, self.docs.eos_id, dtype=np.int64)
        starts = np.zeros(T + 1, dtype=bool)
        real = np.zeros(T + 1, dtype=bool)
        d = int(np.searchsorted(ends, pos, side="right"))
        filled = 0
        while pos < stop:
            doc = int(order[d])
            doc_start = int(ends[d]) - int(self.offsets[doc + 1] - self.offsets[doc])
            offset = pos - doc_start
            piece = self.docs.get(doc, offset, stop - pos)
            tokens[filled : filled + len(piece)] = piece
            starts[filled] = offset == 0
            filled += len(piece)
            pos += len(piece)
            d += 1
        real[:filled] = True
        if filled <= T:  # end-of-epoch padding is one segment of its own, never predicted
            starts[filled] = True
        return tokens, starts, real

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return make_sample(*self.window(index))


def make_sample(tokens: np.ndarray, starts: np.ndarray, real: np.ndarray) -> dict[str, torch.Tensor]:
    """input_ids / labels / position_ids of one window (see the module docstring)."""
    T = len(tokens) - 1
    labels = tokens[1:].copy()
    labels[starts[1:] | ~real[1:]] = IGNORE_INDEX  # never predict a document's first token from the previous one
    seg = starts[:T].copy()
    seg[0] = True  # a document continued from the previous sample starts again at position 0
    idx = np.arange(T)
    position_ids = idx - np.maximum.accumulate(np.where(seg, idx, 0))
    return {
        "input_ids": torch.from_numpy(tokens[:T].copy()),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
    }


# ---------------------------------------------------------------------------------------------
# The blend


class BlendedDataset(torch.utils.data.Dataset):
    """Map-style dataset over an unbounded number of samples: `ds[i]` is deterministic given
    (sources, weights, seq_len, seed) and independent of the data-parallel layout."""

    def __init__(self, sources: list[PackedSource], weights: list[float], seed: int = 0,
                 distill: list[bool] | None = None):
        if not sources or len(sources) != len(weights):
            raise ValueError("blending needs one weight per source and at least one source")
        if len(sources) * (len(sources) - 1) > BLEND_BLOCK:  # the heaviest source must absorb the rounding
            raise ValueError(f"{len(sources)} sources is more than the blend supports (32); merge small sources first")
        w = np.asarray(weights, dtype=np.float64)
        self.sources, self.weights, self.seed = sources, w / w.sum(), seed
        self.names = [s.name for s in sources]
        # With a distilled source every sample says whether it is one: the trainer scores those rows by KL.
        self.distill = list(distill) if distill and any(distill) else None
        self._heaviest = int(np.argmax(self.weights))
        self._block_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _cumulative(self, block: int) -> np.ndarray:
        """Samples per source in blocks [0, block)."""
        c = np.floor(block * BLEND_BLOCK * self.weights).astype(np.int64)
        c[self._heaviest] = 0
        c[self._heaviest] = block * BLEND_BLOCK - c.sum()
        return c

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        if self._block_cache is not None and self._block_cache[0] == block:
            return self._block_cache[1], self._block_cache[2]
        before, after = self._cumulative(block), self._cumulative(block + 1)
        counts = after - before
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0x6B6F, block])))
        source = rng.permutation(np.repeat(np.arange(len(self.sources)), counts))
        within = np.empty(BLEND_BLOCK, dtype=np.int64)
        for s in range(len(self.sources)):
            where = source == s
            within[where] = before[s] + np.arange(counts[s])
        self._block_cache = (block, source, within)
        return source, within

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, sample number within that source) of global sample `index`."""
        block, q = divmod(int(index), BLEND_BLOCK)
        source, within = self._block(block)
        return int(source[q]), int(within[q])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, j = self.locate(index)
        sample = self.sources[s][j]
        if self.distill is not None:
            sample["distill"] = torch.tensor(self.distill[s])
        return sample


class BatchIterator:
    """Micro-batches of one data-parallel rank, step after step. Step k's global batch is samples
    [consumed + k*G, consumed + (k+1)*G) of the dataset; rank r takes the r-th contiguous slice of it
    in micro-batches. Resuming from `state_dict()` (the global `consumed_samples`) under any dp_size
    therefore continues with bit-identical global batches."""

    def __init__(self, dataset, micro_batch: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0):
        if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"micro_batch={micro_batch}, dp_rank={dp_rank}, dp_size={dp_size}: need micro_batch >= 1 and 0 <= dp_rank < dp_size")
        if global_batch % (micro_batch * dp_size):
            raise ValueError(
                f"train.global_batch={global_batch} is not a multiple of micro_batch x data-parallel size = "
                f"{micro_batch} x {dp_size}; pick a global batch divisible by {micro_batch * dp_size}"
            )
        self.dataset, self.micro_batch, self.global_batch = dataset, micro_batch, global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_steps = global_batch // (micro_batch * dp_size)  # gradient accumulation steps
        self.consumed_samples = consumed_samples
        self._micro = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return collate([self.dataset[i] for i in self.skip()])

    def skip(self) -> range:
        """Move past the next micro-batch without building it; returns its sample indices."""
        if isinstance(self.dataset, PackedSource) and not self.dataset.shuffle:
            if self.consumed_samples + self.global_batch > len(self.dataset):
                raise StopIteration
        per_rank = self.global_batch // self.dp_size
        first = self.consumed_samples + self.dp_rank * per_rank + self._micro * self.micro_batch
        self._micro += 1
        if self._micro == self.micro_steps:  # advance before handing out the step's last micro-batch
            self._micro = 0
            self.consumed_samples += self.global_batch
        return range(first, first + self.micro_batch)

    def state_dict(self) -> dict:
        if self._micro:
            raise RuntimeError("BatchIterator.state_dict() called in the middle of a step; save checkpoints after the optimizer step")
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self._micro = 0


class Prefetcher:
    """The micro-batches of a `BatchIterator`, built `depth` ahead by a background thread (and pinned in
    host memory for non-blocking copies to a GPU) while the trainer computes. The wrapped iterator moves
    only as batches are handed out, so its `state_dict()` is what the trainer consumed, whatever was
    prefetched: checkpoints resume exactly."""

    _END = object()

    def __init__(self, iterator: BatchIterator, depth: int = 2, pin_memory: bool = False):
        import queue
        import threading

        self.iterator = iterator
        ahead = BatchIterator(iterator.dataset, iterator.micro_batch, iterator.global_batch, iterator.dp_rank,
                              iterator.dp_size, iterator.consumed_samples)
        ahead._micro = iterator._micro
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(ahead, pin_memory), name="megakor-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, ahead: BatchIterator, pin_memory: bool) -> None:
        try:
            for batch in ahead:
                if pin_memory:
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, raised there
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)  # every later call raises it too
            raise item
        self.iterator.skip()
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def collate(samples: list[dict[str, torch.Tensor]]) -> dict:
    """Stacked [B, T] tensors plus the packing metadata of `megakor.model.attention` (module docstring)."""
    from megakor.model.attention import cu_seqlens_from_positions

    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    batch["cu_seqlens"], batch["max_seqlen"] = cu_seqlens_from_positions(batch["position_ids"])
    return batch


def eval_batches(dataset: PackedSource, micro_batch: int):
    """All windows of an eval source in order, in batches of `micro_batch` (the last may be smaller)."""
    for a in range(0, len(dataset), micro_batch):
        yield collate([dataset[i] for i in range(a, min(a + micro_batch, len(dataset)))])


# ---------------------------------------------------------------------------------------------
# Entry point


def build_datasets(
    train_sources: list[SourceSpec | dict],
    eval_sources: list[SourceSpec | dict] | None,
    tokenizer_path: str | None,
    seq_len: int,
    seed: int = 0,
    cache_dir: str | None = None,
    workers: int = 2,
) -> tuple[BlendedDataset, dict[str, PackedSource]]:
    """(training blend, {name: eval dataset}). Raw sources are preprocessed into `cache_dir` once."""
    if seq_len < 1:
        raise ValueError(f"train.seq_len={seq_len}; give a positive number of tokens")
    train = [SourceSpec.from_dict(s) for s in train_sources]
    evals = [SourceSpec.from_dict(s) for s in (eval_sources or [])]
    if not train:
        raise ValueError("data.sources is empty; list at least one {path, weight} entry")
    for group, label in ((train, "data.sources"), (evals, "data.eval")):
        names = [s.name for s in group]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"{label} has several sources named {dupes}; give each a distinct 'name'")
    from megakor.data.examples import PackedExamples

    def packed(spec, prefix, shuffle, doc_range=None):  # task examples are packed whole, text as a stream
        if spec.format == "chat":
            return PackedExamples(prefix, seq_len, seed, spec.name, shuffle, doc_range, spec.overlong)
        return PackedSource(prefix, seq_len, seed, spec.name, shuffle, cache_dir if shuffle else None, doc_range)

    train_sets, eval_sets = [], {}
    for s in train:
        prefix = resolve_source(s, tokenizer_path, cache_dir, workers)
        n = len(IndexedDataset(prefix))
        if s.holdout_documents >= n:
            raise ValueError(f"data source {s.name} has {n} documents; holdout_documents={s.holdout_documents} must be smaller")
        cut = n - s.holdout_documents
        train_sets.append(packed(s, prefix, True, (0, cut)))
        if s.holdout_documents:
            eval_sets[s.name] = packed(s, prefix, False, (cut, n))
    for s in evals:
        if s.name in eval_sets:
            raise ValueError(f"eval source name {s.name} is also a training source with holdout_documents; rename one")
        eval_sets[s.name] = packed(s, resolve_source(s, tokenizer_path, cache_dir, workers), False)
    for ps in [*train_sets, *eval_sets.values()]:
        if isinstance(ps, PackedExamples) and ps.overlong_examples:
            log.info("task source %s: %d examples longer than train.seq_len + 1 = %d tokens were %s", ps.name,
                        ps.overlong_examples, seq_len + 1, "truncated" if len(ps.examples) == ps.last_doc - ps.first_doc
                        else "dropped")
    eos = {ps.name: ps.docs.eos_id for ps in [*train_sets, *eval_sets.values()]}
    if len(set(eos.values())) > 1:
        raise ValueError(f"sources were tokenised with different EOS ids {eos}; preprocess all of them with the same tokenizer")
    return BlendedDataset(train_sets, [s.weight for s in train], seed, [s.distill for s in train]), eval_sets
