"""Tokenizer loading shared by preprocessing, evaluation, vocabulary extension and training."""

from __future__ import annotations

import os
from pathlib import Path

# Special-token spellings of the families we load, for a bare tokenizer.json that carries no
# tokenizer_config.json to name them.
_KNOWN_BOS_EOS = (
    ("<|begin_of_text|>", "<|end_of_text|>"),  # Llama 3.x
    ("<s>", "</s>"),  # Llama 1/2, Mistral
    ("<|im_start|>", "<|endoftext|>"),  # Qwen2 (no BOS in use; the pair is only a fallback)
    ("<|endoftext|>", "<|endoftext|>"),  # SmolLM2 / GPT-2 style
)


def load_tokenizer(path: str | os.PathLike):
    """Load a fast Hugging Face tokenizer from a directory (tokenizer.json and, where present,
    tokenizer_config.json) or from a bare tokenizer.json file. Returns a
    `transformers.PreTrainedTokenizerBase` with `bos_token_id` / `eos_token_id` set where the files
    (or, for a bare tokenizer.json, the well-known spellings) say."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").exists() and not (p / "tokenizer.model").exists():
            raise FileNotFoundError(
                f"{p} holds no tokenizer.json; pass the directory of a Hugging Face tokenizer "
                "(or a tokenizer.json file) as the tokenizer path"
            )
        if (p / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(str(p))
        file = p / "tokenizer.json"
    elif p.is_file():
        file = p
    else:
        raise FileNotFoundError(f"tokenizer path {p} does not exist; pass a tokenizer directory or tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(file))
    vocab = tok.get_vocab()
    for bos, eos in _KNOWN_BOS_EOS:
        if bos in vocab and eos in vocab:
            tok.bos_token, tok.eos_token = bos, eos
            break
    return tok


def gguf_tokenizer(path: str | os.PathLike):
    """A GGUF file's own tokenizer, built from its metadata as `convert_gguf_to_hf` writes it."""
    import json
    import tempfile

    import gguf

    from megakor.checkpoint.gguf import build_tokenizer, read_metadata

    built, tokenizer_config = build_tokenizer(read_metadata(gguf.GGUFReader(path)), path)
    with tempfile.TemporaryDirectory() as tmp:
        built.save(os.path.join(tmp, "tokenizer.json"))
        Path(tmp, "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False))
        return load_tokenizer(tmp)


def tokenizer_for(model_path: str | os.PathLike, tokenizer_path=None, checkpoint=None):
    """The tokenizer that goes with a model: `tokenizer_path` when given, else a GGUF file's own, a
    training checkpoint's exported one (`checkpoint.tokenizer_path`), or the HF directory's."""
    if tokenizer_path:
        return load_tokenizer(tokenizer_path)
    if Path(model_path).suffix == ".gguf":
        return gguf_tokenizer(model_path)
    if checkpoint is not None and getattr(checkpoint, "tokenizer_path", None):
        return load_tokenizer(checkpoint.tokenizer_path)
    return load_tokenizer(model_path)
