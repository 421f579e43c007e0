"""Data pipeline: raw corpora -> cleaned, deduplicated, tokenised, indexed shards -> blended, packed,
exactly resumable batches. See `preprocess` (offline, `launch/preprocess.py`) and `build_datasets`.

Names are imported lazily: preprocessing workers import `megakor.data.preprocess`, and pulling in
torch (for `blend`) there would cost every worker seconds and memory for nothing."""

import importlib

_EXPORTS = {
    "BatchIterator": "blend",
    "BlendedDataset": "blend",
    "PackedSource": "blend",
    "SourceSpec": "blend",
    "build_datasets": "blend",
    "collate": "blend",
    "eval_batches": "blend",
    "CleanConfig": "clean",
    "Cleaner": "clean",
    "Deduplicator": "dedup",
    "IndexedDataset": "indexed",
    "IndexedWriter": "indexed",
    "PreprocessOptions": "preprocess",
    "preprocess": "preprocess",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megakor.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megakor.data' has no attribute {name!r}")
