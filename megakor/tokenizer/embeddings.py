"""Grow a model's input embedding and LM head to an extended vocabulary (stage 1 freezing of the old
rows is `megakor.model.layers.rows_trainable_from`, applied in the graph).

Plain tensors in, plain tensors out, so the same code serves HF loading, training startup and
`launch/convert.py`. Weights are [vocab, hidden] as in HF (`embed_tokens.weight`, `lm_head.weight`).

Row layout of the result, with B = base tokenizer size, V = extended tokenizer size, R = rows of
the base weight (R >= B; Qwen2 checkpoints pad R past B) and P = V rounded up to `pad_to_multiple_of`:
- rows [0, B): copied unchanged (old tokens, specials included);
- rows [B, V): new tokens, initialised by `method` (these overwrite any padding rows the base had);
- rows [V, max(R, P)): padding no token maps to. Rows the base had keep their values; rows that did
  not exist are zero, which is what Megatron's padded vocabulary does: a zero head row gives logit 0,
  and the embedding row is never looked up.

Initialisation methods for a new token:
- "subword" (EEVE): the mean of the base rows of the token's decomposition under the base tokenizer
  (the base model's segmentation of the token's text, e.g. 대한 -> [대, 한] or three byte tokens);
  the new token starts as the average of the pieces it replaces.
- "mean": the mean of all base token rows.
- "random": normal with mean 0 and the standard deviation of the base token rows.
Means are computed in float64 and rounded once to the weight's dtype.
"""

from __future__ import annotations

import torch

from megakor.tokenizer.extend import as_backend, full_vocab_size

METHODS = ("subword", "mean", "random")
_CHUNK = 8192  # rows converted to float64 at a time


def padded_vocab_size(vocab_size: int, multiple: int = 1) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (for tensor-parallel vocab shards)."""
    if multiple < 1:
        raise ValueError(f"pad_to_multiple_of={multiple}; use 1 (no padding) or e.g. 64 or 128 * TP size")
    return -(-vocab_size // multiple) * multiple


def new_token_decompositions(base_tokenizer, new_tokenizer) -> dict[int, list[int]]:
    """For every id the extended tokenizer adds, the base ids its text splits into under the base
    tokenizer's model (no normaliser, no specials: the token's own spelling, bytes included)."""
    base, new = as_backend(base_tokenizer), as_backend(new_tokenizer)
    base_size, new_size = full_vocab_size(base), full_vocab_size(new)
    for index in range(base_size):
        if base.id_to_token(index) != new.id_to_token(index):
            raise ValueError(f"id {index} is {base.id_to_token(index)!r} in the base tokenizer but "
                             f"{new.id_to_token(index)!r} in the new one; pass the tokenizer it was extended from")
    decompositions = {}
    for index in range(base_size, new_size):
        token = new.id_to_token(index)
        if token is None:
            raise ValueError(f"the new tokenizer has no token with id {index}; its ids must follow "
                             "the base vocabulary without gaps (use megakor.tokenizer.extend)")
        pieces = [t.id for t in base.model.tokenize(token)]
        if not pieces or max(pieces) >= base_size:
            raise ValueError(f"new token {token!r} has no spelling in base tokens; the base tokenizer "
                             "needs byte-level or byte-fallback BPE")
        decompositions[index] = pieces
    return decompositions


def resize_rows(weight: torch.Tensor, base_tokenizer, new_tokenizer, method: str = "subword",
                pad_to_multiple_of: int = 1, generator: torch.Generator | None = None,
                decompositions: dict[int, list[int]] | None = None) -> torch.Tensor:
    """A new [rows, hidden] tensor (same dtype and device) for an embedding or LM head weight grown
    to the extended vocabulary; see the module docstring for the row layout. `decompositions` may be
    passed in (from `new_token_decompositions`) to share the work between embedding and head."""
    if method not in METHODS:
        raise ValueError(f"init method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if weight.dim() != 2:
        raise ValueError(f"expected a [vocab, hidden] weight, got shape {tuple(weight.shape)}; "
                         "pass embed_tokens.weight or lm_head.weight")
    base_size, new_size = full_vocab_size(base_tokenizer), full_vocab_size(new_tokenizer)
    rows = weight.shape[0]
    if rows < base_size:
        raise ValueError(f"the weight has {rows} rows but the base tokenizer has {base_size} ids; "
                         "pass the weights of the model the base tokenizer belongs to")
    total = max(rows, padded_vocab_size(new_size, pad_to_multiple_of))
    out = torch.zeros(total, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[:rows] = weight
    if new_size == base_size:
        return out
    num_new, hidden = new_size - base_size, weight.shape[1]
    if method == "subword":
        if decompositions is None:
            decompositions = new_token_decompositions(base_tokenizer, new_tokenizer)
        # A scatter-add over all (new row, base row) pairs, in chunks so that no float64 copy of a
        # whole 128k x 4096 matrix is ever made.
        targets = torch.tensor([i - base_size for i, ids in decompositions.items() for _ in ids],
                               device=weight.device)
        sources = torch.tensor([j for ids in decompositions.values() for j in ids], device=weight.device)
        sums = torch.zeros(num_new, hidden, dtype=torch.float64, device=weight.device)
        for c in range(0, len(sources), _CHUNK):
            sums.index_add_(0, targets[c:c + _CHUNK], weight[sources[c:c + _CHUNK]].to(torch.float64))
        counts = torch.bincount(targets, minlength=num_new).to(torch.float64)
        new_rows = sums / counts[:, None]
    else:
        row_sum = torch.zeros(hidden, dtype=torch.float64, device=weight.device)
        total_sq = torch.zeros((), dtype=torch.float64, device=weight.device)
        for c in range(0, base_size, _CHUNK):
            rows64 = weight[c:min(c + _CHUNK, base_size)].to(torch.float64)
            row_sum += rows64.sum(0)
            total_sq += rows64.square().sum()
        if method == "mean":
            new_rows = (row_sum / base_size).expand(num_new, hidden)
        else:
            n = base_size * hidden
            std = ((total_sq - row_sum.sum() ** 2 / n) / (n - 1)).clamp_min(0).sqrt().item()
            new_rows = torch.randn(num_new, hidden, generator=generator, dtype=torch.float64) * std
    out[base_size:new_size] = new_rows.to(device=weight.device, dtype=weight.dtype)
    return out


def resize_embeddings(embed: torch.Tensor, head: torch.Tensor | None, base_tokenizer, new_tokenizer,
                      method: str = "subword", pad_to_multiple_of: int = 1, seed: int = 0):
    """(new embedding, new head) for a model with input embedding `embed` and LM head `head`
    (None, or the same tensor, when tied: the returned head is then the returned embedding itself).
    Untied heads are initialised from their own rows by the same method."""
    generator = torch.Generator().manual_seed(seed)
    decompositions = new_token_decompositions(base_tokenizer, new_tokenizer) if method == "subword" else None
    new_embed = resize_rows(embed, base_tokenizer, new_tokenizer, method, pad_to_multiple_of, generator, decompositions)
    if head is None or head is embed or (head.data_ptr() == embed.data_ptr() and head.shape == embed.shape):
        return new_embed, new_embed
    if head.shape[1] != embed.shape[1]:
        raise ValueError(f"embedding hidden size {embed.shape[1]} differs from the head's {head.shape[1]}; "
                         "pass lm_head.weight in HF's [vocab, hidden] layout")
    new_head = resize_rows(head, base_tokenizer, new_tokenizer, method, pad_to_multiple_of, generator, decompositions)
    return new_embed, new_head
