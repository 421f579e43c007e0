"""Task examples (supervised fine-tuning) packed whole into rows: no example is split across rows.

A source preprocessed with `format: chat` holds one document per example (`ids + [eos]`) and a loss mask
(`P.mask`, see `megakor.data.chat`). Packing: the examples are put in a seeded random order once and
placed greedily into rows of `seq_len + 1` tokens (an example that does not fit in the current row
starts the next one); the rest of a row is EOS padding, one segment, never predicted. Each epoch
visits the rows in its own seeded order. Rows are windows exactly like `PackedSource`'s (input = first
T tokens, labels = last T), so every example keeps its own positions and the packed attention path
keeps examples apart; labels are additionally -100 wherever the mask says "context".

An example longer than `seq_len + 1` tokens is truncated to it (`overlong: truncate`, the default) or
left out (`overlong: drop`); either way it is counted (`overlong_examples`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from megakor.data.indexed import IndexedDataset

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
OVERLONG = ("truncate", "drop")


class PackedExamples:
    """Rows of whole examples over one task source (module docstring). `shuffle=False` (eval) keeps
    examples and rows in order and has a single epoch."""

    is_task_data = True

    def __init__(self, prefix: str, seq_len: int, seed: int = 0, name: str = "", shuffle: bool = True,
                 doc_range: tuple[int, int] | None = None, overlong: str = "truncate"):
        if overlong not in OVERLONG:
            raise ValueError(f"overlong={overlong!r}; use truncate or drop")
        self.docs = IndexedDataset(prefix)
        if self.docs.loss_mask is None:
            raise ValueError(f"{prefix} has no loss mask ({prefix}.mask); preprocess it with format: chat")
        self.prefix, self.seq_len, self.seed, self.name, self.shuffle = prefix, seq_len, seed, name or prefix, shuffle
        self.first_doc, self.last_doc = doc_range or (0, len(self.docs))
        cap = seq_len + 1
        lengths = np.diff(np.asarray(self.docs.offsets[self.first_doc:self.last_doc + 1]))
        too_long = lengths > cap
        self.overlong_examples = int(too_long.sum())
        keep = ~too_long if overlong == "drop" else np.ones(len(lengths), dtype=bool)
        self.examples = self.first_doc + np.flatnonzero(keep)
        self.lengths = np.minimum(lengths[keep], cap)
        if not len(self.examples):
            raise ValueError(f"task source {self.name} has no example of at most train.seq_len + 1 = {cap} tokens")
        self.num_tokens = int(self.lengths.sum())
        order = np.arange(len(self.examples))
        if shuffle:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5F7, len(order)])))
            order = rng.permutation(order)
        self.order = order
        # Greedy packing in that order: row r holds order[row_start[r]:row_start[r + 1]].
        starts, used = [0], 0
        for i, n in enumerate(self.lengths[order]):
            if used + n > cap:
                starts.append(i)
                used = 0
            used += int(n)
        starts.append(len(order))
        self.row_start = np.asarray(starts, dtype=np.int64)
        self.rows_per_epoch = len(starts) - 1

    def __len__(self) -> int:
        return self.rows_per_epoch

    def _mask(self, doc: int, n: int) -> np.ndarray:
        a = int(self.docs.offsets[doc])
        return self.docs.loss_mask[a:a + n]

    def _row_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rows_per_epoch)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0x5F8, epoch])))
        return rng.permutation(self.rows_per_epoch)

    def window(self, index: int):
        """(tokens[T+1], starts[T+1], real[T+1], target[T+1]) of row `index` (epochs wrap when shuffled)."""
        epoch, j = divmod(int(index), self.rows_per_epoch)
        if not self.shuffle and epoch:
            raise IndexError(f"eval row {index} is past the end ({self.rows_per_epoch} rows)")
        r = int(self._row_order(epoch)[j]) if self.shuffle else j
        T = self.seq_len
        tokens = np.full(T + 1, self.docs.eos_id, dtype=np.int64)
        starts = np.zeros(T + 1, dtype=bool)
        real = np.zeros(T + 1, dtype=bool)
        target = np.zeros(T + 1, dtype=bool)
        filled = 0
        for k in self.order[self.row_start[r]:self.row_start[r + 1]]:
            doc, n = int(self.examples[k]), int(self.lengths[k])
            tokens[filled:filled + n] = self.docs.get(doc, 0, n)
            target[filled:filled + n] = self._mask(doc, n).astype(bool)
            starts[filled] = True
            filled += n
        real[:filled] = True
        if filled <= T:
            starts[filled] = True  # the padding is one segment of its own
        return tokens, starts, real, target

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from megakor.data.blend import make_sample

        tokens, starts, real, target = self.window(index)
        sample = make_sample(tokens, starts, real)
        sample["labels"][~torch.from_numpy(target[1:])] = IGNORE_INDEX  # only the assistant's tokens are predicted
        return sample


def eval_rows(source: PackedExamples, max_rows: int = 0) -> np.ndarray:
    """[R, 3, T] int64 rows (input_ids, position_ids, labels) of an eval task source, in order: the
    response-only loss the trainer reports as eval/<name>_loss. `max_rows` > 0 keeps the first rows."""
    n = len(source) if not max_rows else min(max_rows, len(source))
    rows = np.empty((n, 3, source.seq_len), dtype=np.int64)
    for i in range(n):
        s = source[i]
        rows[i, 0], rows[i, 1], rows[i, 2] = s["input_ids"].numpy(), s["position_ids"].numpy(), s["labels"].numpy()
    return rows
