"""Fertility counting against hand counts and a brute-force reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megakor.tokenizer import fertility

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared/fixtures"
LLAMA2 = FIXTURES / "tokenizers/llama2"


def test_hand_counted_llama2():
    if not LLAMA2.exists():
        pytest.skip(f"{LLAMA2} is absent (shared fixtures not checked out)")
    # Llama 2: ▁ 대 한 | ▁ 민 국 | ▁abc  -> 7 tokens; the lone ▁ belongs to the word after it.
    # English: ▁Hello ▁world -> 2 tokens over 11 characters.
    result = fertility.fertility(LLAMA2, ["대한 민국 abc"], ["Hello world"])
    assert (result["ko_tokens"], result["ko_chars"], result["ko_eojeols"]) == (7, 9, 3)
    assert (result["ko_hangul_eojeols"], result["ko_hangul_eojeol_tokens"]) == (2, 6)
    assert result["ko_tokens_per_100_chars"] == pytest.approx(700 / 9)
    assert result["ko_tokens_per_eojeol"] == pytest.approx(7 / 3)
    assert result["ko_hangul_tokens_per_eojeol"] == pytest.approx(3.0)
    assert result["en_tokens_per_100_chars"] == pytest.approx(200 / 11)
    assert result["vocab_size"] == 32000


def _reference_hangul_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Walk each token's last character to its word (or, in whitespace, the next word) by scanning."""
    total = 0
    for start, end in tokenizer.encode(text, add_special_tokens=False).offsets:
        pos = max(start, end - 1)
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            continue
        left = pos
        while left > 0 and not text[left - 1].isspace():
            left -= 1
        right = pos
        while right < len(text) and not text[right].isspace():
            right += 1
        total += any("\uac00" <= c <= "\ud7a3" for c in text[left:right])
    return total


def test_hangul_word_attribution_matches_brute_force():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["대한민국은 민주공화국이다. 모든 권력은 국민으로부터 나온다.", "The quick brown fox."] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ko = ["대한민국은  민주공화국이다.\n\n모든 권력은 (국민)으로부터 나온다 abc 123 ", "헌법 제1조 ① 대한민국은"]
    result = fertility.fertility(tok, ko, ["The quick brown fox."], normalize=lambda t: t)
    assert result["ko_hangul_eojeol_tokens"] == sum(_reference_hangul_tokens(tok, t) for t in ko)
    assert result["ko_tokens"] == sum(len(tok.encode(t).ids) for t in ko)
    assert result["ko_eojeols"] == sum(len(t.split()) for t in ko)
    assert result["ko_hangul_eojeols"] == 6 + 3  # ①, abc and 123 are not Hangul words


def test_report_and_errors():
    if not LLAMA2.exists():
        pytest.skip(f"{LLAMA2} is absent (shared fixtures not checked out)")
    report = fertility.fertility_report(LLAMA2, LLAMA2, ["대한 민국"], ["Hello"])
    assert all(v == 0 for v in report["relative_change"].values())
    table = fertility.format_report(report)
    assert "ko tokens / Hangul eojeol" in table and "en tokens / 100 chars" in table
    with pytest.raises(ValueError, match="--eval-en"):
        fertility.fertility(LLAMA2, ["대한"], [])
    with pytest.raises(ValueError, match="holds no Hangul"):
        fertility.fertility(LLAMA2, ["abc"], ["abc"])
