"""Fertility: how many tokens a tokenizer spends on Korean and English text.

Reported per 100 characters and per eojeol (a whitespace-separated word, the unit Korean writing
spaces by). "Hangul eojeols" are the words that contain Hangul: counting only them shows what a
Korean extension changes, without the numbers, punctuation and Latin words that share Korean text.
A token belongs to the word holding its last character; a whitespace-only token (Llama 2's lone
"▁", a newline run) belongs to the word that follows, as the space it spells begins that word.
"""

from __future__ import annotations

import bisect
import re

from megakor.tokenizer.extend import as_backend, contains_hangul, full_vocab_size, normalize_korean

_WORD = re.compile(r"\S+")
METRICS = (  # (key, label in the printed table)
    ("ko_tokens_per_100_chars", "ko tokens / 100 chars"),
    ("ko_tokens_per_eojeol", "ko tokens / eojeol"),
    ("ko_hangul_tokens_per_eojeol", "ko tokens / Hangul eojeol"),
    ("en_tokens_per_100_chars", "en tokens / 100 chars"),
)


def _count(tokenizer, texts: list[str]) -> dict[str, int]:
    """Characters, tokens, words, Hangul words and tokens of Hangul words over `texts`."""
    totals = {"chars": 0, "tokens": 0, "eojeols": 0, "hangul_eojeols": 0, "hangul_eojeol_tokens": 0}
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    for text, encoding in zip(texts, encodings):
        words = [(m.start(), m.end(), contains_hangul(m.group())) for m in _WORD.finditer(text)]
        starts = [w[0] for w in words]
        ends = [w[1] for w in words]
        totals["chars"] += len(text)
        totals["tokens"] += len(encoding.ids)
        totals["eojeols"] += len(words)
        totals["hangul_eojeols"] += sum(w[2] for w in words)
        for start, end in encoding.offsets:
            last = max(start, end - 1)
            # The first word ending after `last` is the one that holds it or, for whitespace,
            # the one that follows.
            k = bisect.bisect_right(ends, last)
            if k < len(words) and words[k][2] and (starts[k] <= last or text[last].isspace()):
                totals["hangul_eojeol_tokens"] += 1
    return totals


def fertility(tokenizer, ko_texts: list[str], en_texts: list[str], normalize=normalize_korean) -> dict:
    """Fertility of one tokenizer (path, transformers or `tokenizers` object) on Korean and English
    documents, after `normalize`; special tokens are not counted."""
    backend = as_backend(tokenizer)
    ko_texts = [t for t in map(normalize, ko_texts) if t]
    en_texts = [t for t in map(normalize, en_texts) if t]
    if not ko_texts or not en_texts:
        raise ValueError("fertility needs Korean and English evaluation text; pass non-empty "
                         "--eval-ko and --eval-en files")
    ko, en = _count(backend, ko_texts), _count(backend, en_texts)
    if not ko["hangul_eojeols"]:
        raise ValueError("the Korean evaluation text holds no Hangul; pass Korean text as --eval-ko")
    return {
        "vocab_size": full_vocab_size(backend),
        "ko_chars": ko["chars"], "ko_tokens": ko["tokens"], "ko_eojeols": ko["eojeols"],
        "ko_hangul_eojeols": ko["hangul_eojeols"], "ko_hangul_eojeol_tokens": ko["hangul_eojeol_tokens"],
        "en_chars": en["chars"], "en_tokens": en["tokens"],
        "ko_tokens_per_100_chars": 100 * ko["tokens"] / ko["chars"],
        "ko_tokens_per_eojeol": ko["tokens"] / ko["eojeols"],
        "ko_hangul_tokens_per_eojeol": ko["hangul_eojeol_tokens"] / ko["hangul_eojeols"],
        "en_tokens_per_100_chars": 100 * en["tokens"] / en["chars"],
    }


def fertility_report(base, extended, ko_texts: list[str], en_texts: list[str],
                     normalize=normalize_korean) -> dict:
    """Before/after fertility and the relative change of each metric ((after - before) / before,
    so -0.5 means half the tokens)."""
    before = fertility(base, ko_texts, en_texts, normalize)
    after = fertility(extended, ko_texts, en_texts, normalize)
    change = {key: (after[key] - before[key]) / before[key] for key, _ in METRICS}
    return {"base": before, "extended": after, "relative_change": change}


def format_report(report: dict) -> str:
    """The report as a plain-text table."""
    before, after, change = report["base"], report["extended"], report["relative_change"]
    lines = [f"{'metric':28s} {'base':>10s} {'extended':>10s} {'change':>8s}"]
    for key, label in METRICS:
        lines.append(f"{label:28s} {before[key]:10.3f} {after[key]:10.3f} {100 * change[key]:+7.1f}%")
    lines.append(f"{'vocabulary size':28s} {before['vocab_size']:10d} {after['vocab_size']:10d}")
    lines.append(f"(Korean: {before['ko_chars']:,} chars, {before['ko_eojeols']:,} eojeols, "
                 f"{before['ko_hangul_eojeols']:,} with Hangul; English: {before['en_chars']:,} chars)")
    return "\n".join(lines)
