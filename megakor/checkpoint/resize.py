"""Grow an HF checkpoint's vocabulary to an extended tokenizer, offline (`launch/convert.py --tokenizer`).

Rows of tokens the base already had are copied bit for bit; rows of new tokens are initialised by
`megakor.tokenizer.embeddings` (subword mean by default, EEVE's recipe). The result is a normal HF
directory with the extended tokenizer's files, so every tool downstream sees one consistent model.
"""

from __future__ import annotations

import os
from pathlib import Path

from megakor.checkpoint.hf import HFCheckpoint, load_state_dict, save_hf_checkpoint
from megakor.model.args import replace
from megakor.tokenizer import load_tokenizer
from megakor.tokenizer.embeddings import resize_embeddings


def resize_checkpoint_vocab(ckpt: HFCheckpoint, base_tokenizer_dir, new_tokenizer_dir, out_dir: str | os.PathLike,
                            method: str = "subword", seed: int = 0) -> Path:
    base_tok, new_tok = load_tokenizer(base_tokenizer_dir), load_tokenizer(new_tokenizer_dir)
    sd = load_state_dict(ckpt)
    embed = sd["tok_embeddings.weight"]
    head = sd.get("lm_head.weight")
    new_embed, new_head = resize_embeddings(embed, head, base_tok, new_tok, method, seed=seed)
    # Qwen2-style checkpoints carry more rows than tokens; keep them (resize_rows leaves them intact).
    vocab = max(len(new_tok), embed.shape[0])
    sd["tok_embeddings.weight"] = new_embed[:vocab]
    if head is not None:
        sd["lm_head.weight"] = new_head[:vocab]
    args = replace(ckpt.args, vocab_size=vocab)
    return save_hf_checkpoint(sd, args, out_dir, base_config=ckpt.hf_config, tokenizer_dir=new_tokenizer_dir)
