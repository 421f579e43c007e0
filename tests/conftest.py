"""Shared test fixtures: tiny random Hugging Face checkpoints of every family, built with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)

# name → (transformers config class name, config overrides)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4, rms_norm_eps=1e-5)),
    "llama_linear": ("LlamaConfig", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama_dynamic": ("LlamaConfig", dict(num_key_value_heads=2, max_position_embeddings=32,
                                          rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=24)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "tied": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


def tiny_tokenizer_dir(path: Path) -> Path:
    """A byte-level BPE tokenizer (vocab ~300) trained on a little Korean and English, saved as an HF dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다.", "The quick brown fox jumps over the lazy dog."] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    return path


def make_hf_checkpoint(path: Path, family: str, vocab_size: int = 300, dtype=torch.float32, seed: int = 0) -> Path:
    import transformers

    cls_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1,
                                          pad_token_id=2, **{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # Random biases and norm weights, so a dropped bias or norm shows up in parity.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(str(path))
    tiny_tokenizer_dir(path)
    return path


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_checkpoint(root / name, name) for name in FAMILIES}
