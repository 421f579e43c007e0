"""Exact and near-duplicate detection across all documents of a source.

Workers compute, per document, an exact key (a 64-bit hash of the normalised text) and a MinHash
signature (datasketch's MinHash over character 5-gram shingles). The main process then walks the
documents in input order and keeps the first of every group of duplicates, so the result does not
depend on how many workers ran or in which order they finished.

Near duplicates use the LSH banding that `datasketch.MinHashLSH` chooses for the threshold (its
b bands of r rows); a candidate that shares a band is confirmed by the estimated Jaccard
similarity of the two signatures, so band collisions below the threshold do not drop documents.
Memory: about 1 KB per kept document (signature and band keys), all in the main process.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

import numpy as np

SHINGLE_CHARS = 5
MINHASH_SEED = 1
_SPACES = re.compile(r"\s+")


def normalise_for_dedup(text: str) -> str:
    """NFC, lower case, whitespace runs collapsed: two documents that differ only in these are one."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text).lower()).strip()


def exact_key(text: str) -> int:
    """64-bit hash of the normalised text (an unsigned int)."""
    digest = hashlib.blake2b(normalise_for_dedup(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shingle_hashes(text: str, n: int = SHINGLE_CHARS) -> np.ndarray:
    """Distinct 32-bit hashes of the character n-grams of the normalised text, computed with numpy
    (a polynomial hash over code points) because hashing each shingle in Python dominates otherwise."""
    codes = np.frombuffer(normalise_for_dedup(text).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) == 0:
        return np.zeros(1, dtype=np.uint32)
    n = min(n, len(codes))
    h = np.zeros(len(codes) - n + 1, dtype=np.uint64)
    for k in range(n):  # uint64 arithmetic wraps, which is what a polynomial hash mod 2**64 wants
        h = h * np.uint64(1_000_003) + codes[k : len(codes) - n + 1 + k]
    folded = (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
    return np.unique(folded.astype(np.uint32))


class MinHasher:
    """datasketch MinHash signatures for texts, with a fixed seed so signatures from different
    worker processes compare."""

    def __init__(self, num_perm: int = 64):
        from datasketch import MinHash

        self.num_perm = num_perm
        # Shingles are hashed already; the identity keeps datasketch from hashing them again.
        self._template = MinHash(num_perm=num_perm, seed=MINHASH_SEED, hashfunc=_identity)

    def signature(self, text: str) -> np.ndarray:
        m = self._template.copy()
        m.update_batch(shingle_hashes(text).tolist())
        return np.asarray(m.hashvalues).copy()


def _identity(x):
    return x


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for this threshold."""
    from datasketch import MinHashLSH

    try:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    except ValueError:  # thresholds near 1 want a single band, which datasketch refuses; two halves work
        return 2, num_perm // 2
    return lsh.b, lsh.r


class Deduplicator:
    """`check(key, signature)` returns "exact_duplicate", "near_duplicate" or None (keep: the
    document is remembered, so later copies of it are caught)."""

    def __init__(self, exact: bool = True, near: bool = True, threshold: float = 0.8, num_perm: int = 64):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold {threshold} is outside (0, 1]; give a Jaccard similarity such as 0.8")
        self.exact, self.near, self.threshold, self.num_perm = exact, near, threshold, num_perm
        self.counts: Counter = Counter()
        self._seen: set[int] = set()
        if near:
            self.bands, self.rows = lsh_bands(threshold, num_perm)
            self._buckets: list[dict[bytes, int]] = [{} for _ in range(self.bands)]
            self._signatures = np.zeros((1024, num_perm), dtype=np.uint64)
            self._kept = 0

    def check(self, key: int | None, signature: np.ndarray | None) -> str | None:
        if self.exact:
            if key in self._seen:
                self.counts["exact_duplicate"] += 1
                return "exact_duplicate"
        if self.near:
            sig = np.asarray(signature, dtype=np.uint64)
            band_keys = [sig[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(self.bands)]
            candidates = {self._buckets[b][k] for b, k in enumerate(band_keys) if k in self._buckets[b]}
            for c in sorted(candidates):
                if np.mean(self._signatures[c] == sig) >= self.threshold:
                    self.counts["near_duplicate"] += 1
                    return "near_duplicate"
            if self._kept == len(self._signatures):
                self._signatures = np.concatenate([self._signatures, np.zeros_like(self._signatures)])
            self._signatures[self._kept] = sig
            for b, k in enumerate(band_keys):
                self._buckets[b].setdefault(k, self._kept)
            self._kept += 1
        if self.exact:
            self._seen.add(key)
        return None
