"""Indexed memory-mapped token dataset: `P.bin` holds the token ids of every document back to back,
`P.idx` a small header and the document offsets into `P.bin`.

Layout of `P.idx` (little endian):
    bytes 0-7    magic b"MKIDX\\x00\\x00\\x01"
    bytes 8-15   uint64 dtype code (1 = uint8, 2 = uint16, 4 = uint32)
    bytes 16-23  uint64 number of documents
    bytes 24-31  uint64 number of tokens
    bytes 32-39  int64  EOS id the documents end with (-1 when unknown)
    bytes 40-47  uint64 vocabulary size of the tokenizer that wrote it
    bytes 48-63  zero
    then         int64[num_documents + 1] token offsets (offsets[0] = 0)

Task data (supervised fine-tuning) adds `P.mask`, one uint8 per token of `P.bin` (1 = the token is a
training target, 0 = context only: prompts, role headers), after a 16-byte header: magic
b"MKMASK\x00\x01" and uint64 number of tokens. Prefixes without it (every pretraining prefix, and all
written before it existed) load unchanged, with `loss_mask` None: every token is a target.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MAGIC = b"MKIDX\x00\x00\x01"
HEADER_BYTES = 64
MASK_MAGIC = b"MKMASK\x00\x01"
MASK_HEADER_BYTES = 16
_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary of `vocab_size` tokens."""
    for code in (1, 2, 4):
        if vocab_size <= np.iinfo(_DTYPES[code]).max + 1:
            return np.dtype(_DTYPES[code])
    raise ValueError(f"vocabulary of {vocab_size} tokens does not fit uint32; no LLaMA-class tokenizer is that large")


def is_indexed_prefix(prefix: str | os.PathLike) -> bool:
    """True when `prefix.bin` and `prefix.idx` both exist (a finished preprocessed dataset)."""
    p = str(prefix)
    return os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx")


class IndexedWriter:
    """Appends documents (arrays of token ids) to `prefix.bin.tmp`; `finish()` writes the index and
    renames both files into place, so a crash never leaves a half-written dataset that looks whole."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int, eos_id: int | None, with_mask: bool = False):
        self.prefix = str(prefix)
        self.dtype = dtype_for_vocab(vocab_size)
        self.vocab_size = int(vocab_size)
        self.eos_id = -1 if eos_id is None else int(eos_id)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self.prefix + ".bin.tmp", "wb")
        self._mask = None
        if with_mask:  # the token count in its header is filled in by finish()
            self._mask = open(self.prefix + ".mask.tmp", "wb")
            self._mask.write(MASK_MAGIC + bytes(8))
        self._offsets = [0]

    def _write_mask(self, mask, n: int) -> None:
        if (mask is None) != (self._mask is None):
            raise ValueError("give a loss mask with every document exactly when the writer was made with_mask=True")
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if len(mask) != n:
                raise ValueError(f"a loss mask of {len(mask)} entries for {n} tokens")
            self._mask.write(mask.tobytes())

    def add(self, ids, mask=None) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._write_mask(mask, len(arr))
        self._bin.write(arr.tobytes())
        self._offsets.append(self._offsets[-1] + len(arr))

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append several documents at once: `tokens` is their concatenation, `lengths` their sizes."""
        self._write_mask(mask, len(tokens))
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        ends = self._offsets[-1] + np.cumsum(lengths, dtype=np.int64)
        self._offsets.extend(ends.tolist())

    def finish(self) -> None:
        self._bin.close()
        write_index(self.prefix + ".idx.tmp", np.asarray(self._offsets, dtype=np.int64), self.dtype, self.eos_id, self.vocab_size)
        if self._mask is not None:
            self._mask.seek(len(MASK_MAGIC))
            self._mask.write(np.uint64(self._offsets[-1]).tobytes())
            self._mask.close()
            os.replace(self.prefix + ".mask.tmp", self.prefix + ".mask")
        elif os.path.exists(self.prefix + ".mask"):  # a stale mask of an earlier task dataset at this prefix
            os.remove(self.prefix + ".mask")
        # .bin first: a prefix counts as finished only when .idx exists, and .idx lands last.
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")

    def abort(self) -> None:
        self._bin.close()
        if self._mask is not None:
            self._mask.close()
        for suffix in (".bin.tmp", ".idx.tmp", ".mask.tmp"):
            if os.path.exists(self.prefix + suffix):
                os.remove(self.prefix + suffix)


def write_index(path: str, offsets: np.ndarray, dtype, eos_id: int, vocab_size: int) -> None:
    header = np.zeros(HEADER_BYTES // 8, dtype=np.uint64)
    header[1] = np.dtype(dtype).itemsize
    header[2] = len(offsets) - 1
    header[3] = int(offsets[-1])
    header[4] = np.array(eos_id, dtype=np.int64).view(np.uint64)
    header[5] = vocab_size
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(header[1:].tobytes())
        f.write(np.asarray(offsets, dtype="<i8").tobytes())


class IndexedDataset:
    """Read side: `ds[i]` is document i as a read-only numpy view into the memory-mapped `.bin`."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        if not is_indexed_prefix(self.prefix):
            raise FileNotFoundError(
                f"{self.prefix}.bin / .idx not found; run launch/preprocess.py with --output-prefix {self.prefix} first"
            )
        with open(self.prefix + ".idx", "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise ValueError(f"{self.prefix}.idx is not a megakor index; rebuild it with launch/preprocess.py")
        header = np.frombuffer(head, dtype="<u8")
        code, num_docs, num_tokens = int(header[1]), int(header[2]), int(header[3])
        if code not in _DTYPES:
            raise ValueError(f"{self.prefix}.idx names token width {code} bytes; rebuild it with launch/preprocess.py")
        self.dtype = np.dtype(_DTYPES[code])
        self.eos_id = int(header[4].view(np.int64))
        self.vocab_size = int(header[5])
        self.offsets = np.memmap(self.prefix + ".idx", dtype="<i8", mode="r", offset=HEADER_BYTES, shape=(num_docs + 1,))
        bin_size = os.path.getsize(self.prefix + ".bin")
        if bin_size != num_tokens * self.dtype.itemsize:
            raise ValueError(
                f"{self.prefix}.bin holds {bin_size} bytes but the index expects {num_tokens * self.dtype.itemsize}; "
                "the dataset is incomplete, delete both files and preprocess again"
            )
        # np.memmap refuses empty files; an empty dataset is still a valid (if useless) dataset.
        self.tokens = (
            np.memmap(self.prefix + ".bin", dtype=self.dtype, mode="r") if num_tokens else np.zeros(0, dtype=self.dtype)
        )
        self.num_tokens = num_tokens
        self.loss_mask = read_loss_mask(self.prefix, num_tokens)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of document i from `offset`, at most `length` of them."""
        start = int(self.offsets[i]) + offset
        end = int(self.offsets[i + 1]) if length is None else min(int(self.offsets[i + 1]), start + length)
        return self.tokens[start:end]


def read_loss_mask(prefix: str, num_tokens: int) -> np.ndarray | None:
    """`prefix.mask` memory-mapped (uint8 per token), or None when the prefix has none."""
    path = prefix + ".mask"
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(MASK_HEADER_BYTES)
    if len(head) < MASK_HEADER_BYTES or head[:8] != MASK_MAGIC:
        raise ValueError(f"{path} is not a megakor loss mask; delete it and preprocess {prefix} again")
    count = int(np.frombuffer(head[8:], dtype="<u8")[0])
    if count != num_tokens or os.path.getsize(path) != MASK_HEADER_BYTES + num_tokens:
        raise ValueError(f"{path} covers {count} tokens but {prefix}.bin holds {num_tokens}; preprocess it again")
    if not num_tokens:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=MASK_HEADER_BYTES, shape=(num_tokens,))
