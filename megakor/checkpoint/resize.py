"""Grow a checkpoint's vocabulary to an extended tokenizer: at training start-up or offline.

`ResizedCheckpoint` wraps an `HFCheckpoint` and serves the embedding and LM head grown to the
extended tokenizer (rows of old tokens bit for bit, rows of new tokens initialised by
`megakor.tokenizer.embeddings`: subword mean by default, EEVE's recipe); every other tensor passes
through. It keeps the slicing API, so the trainer reads its TP slices exactly as from a plain
checkpoint. `resize_checkpoint_vocab` writes it out as a normal HF directory
(`launch/convert.py --model DIR --tokenizer EXTENDED --out DIR`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megakor.checkpoint.hf import HFCheckpoint, load_state_dict, save_hf_checkpoint
from megakor.model.args import replace, to_hf_config
from megakor.tokenizer import load_tokenizer
from megakor.tokenizer.embeddings import resize_embeddings

EXTENSION_FILE = "megakor_extension.json"  # written by launch/extend_tokenizer.py next to the tokenizer


def base_vocab_size(tokenizer_dir) -> int | None:
    """The vocabulary size before extension, from the extended tokenizer's megakor_extension.json."""
    p = Path(tokenizer_dir) / EXTENSION_FILE if tokenizer_dir else None
    if p is None or not p.is_file():
        return None
    return int(json.loads(p.read_text())["base_vocab_size"])


class ResizedCheckpoint(HFCheckpoint):
    def __init__(self, ckpt: HFCheckpoint, base_tokenizer_dir, new_tokenizer_dir, method: str = "subword",
                 seed: int = 0):
        base_tok, new_tok = load_tokenizer(base_tokenizer_dir), load_tokenizer(new_tokenizer_dir)
        self.inner = ckpt
        self.path = ckpt.path
        # The grown rows are computed once, from the whole embedding (and head): a small part of the model.
        embed = ckpt.read("model.embed_tokens.weight")
        head = None if ckpt.args.tie_word_embeddings else ckpt.read("lm_head.weight")
        new_embed, new_head = resize_embeddings(embed, head, base_tok, new_tok, method, seed=seed)
        # Qwen2-style checkpoints carry more rows than tokens; resize_rows keeps them.
        vocab = max(len(new_tok), embed.shape[0])
        self._grown = {"model.embed_tokens.weight": new_embed[:vocab]}
        if head is not None:
            self._grown["lm_head.weight"] = new_head[:vocab]
        self.args = replace(ckpt.args, vocab_size=vocab)
        self.hf_config = to_hf_config(self.args, ckpt.hf_config)
        self.num_base_rows = len(base_tok)
        self._memory, self._open, self._files = None, {}, dict(ckpt._files)

    def shape(self, key: str) -> list[int]:
        return list(self._grown[key].shape) if key in self._grown else self.inner.shape(key)

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if key not in self._grown:
            return self.inner.read(key, dim, start, stop)
        t = self._grown[key]
        return t if dim is None else t.narrow(dim, start, (stop if stop is not None else t.shape[dim]) - start).clone()


def resize_checkpoint_vocab(ckpt: HFCheckpoint, base_tokenizer_dir, new_tokenizer_dir, out_dir: str | os.PathLike,
                            method: str = "subword", seed: int = 0) -> Path:
    resized = ResizedCheckpoint(ckpt, base_tokenizer_dir, new_tokenizer_dir, method, seed)
    return save_hf_checkpoint(load_state_dict(resized), resized.args, out_dir, base_config=resized.hf_config,
                              tokenizer_dir=new_tokenizer_dir)
