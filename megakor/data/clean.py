"""Cleaning Korean (and replay) documents: normalisation, PII masking and quality filters.

Every rule can be switched off in `CleanConfig` and every rule is counted: a rewriting rule counts
the documents it changed (PII rules count the matches masked), a filter counts the documents it
dropped, under the filter's reason name in the preprocessing report.

Order matters: NFC first (NFD jamo sequences would otherwise defeat the Hangul ratio and the PII
patterns), then invisible characters, then HTML (its tags hide whitespace), then PII, then
whitespace (masking and tag removal leave runs of spaces), then the filters on the final text.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, fields

# Characters to delete: C0/C1 controls other than \t \n \r, zero-width and invisible formatting
# characters (ZWSP/ZWNJ/ZWJ, word joiner, BOM, soft hyphen, bidi marks), and the Hangul fillers
# that render as nothing (U+115F/U+1160 choseong/jungseong fillers, U+3164, U+FFA0).
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f"
    "\ufeff\ufff9-\ufffb\u115f\u1160\u3164\uffa0]"
)
# Tags that look like HTML (a letter after '<'), comments, and script/style bodies; a bare '<' in
# text such as "a < b" or "<표 1>" (Hangul after '<') is left alone.
_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
_HTML_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_BLOCK_TAG = re.compile(r"<(?:br|p|div|li|tr|h[1-6])\b[^<>]*/?>", re.IGNORECASE)
# Every Unicode space other than \n and \t becomes a plain space (NBSP, ideographic space U+3000 ...).
_ODD_SPACE = re.compile("[\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\r\f\v]")
_SPACE_RUN = re.compile(r"[ \t]+")
_SPACE_AROUND_NEWLINE = re.compile(r" *\n *")
_NEWLINE_RUN = re.compile(r"\n{3,}")

# PII. Lookarounds keep the patterns from matching inside longer digit runs.
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# 주민등록번호 / 외국인등록번호: YYMMDD-GNNNNNN, G in 1-8 (1/2 1900s, 3/4 2000s, 5-8 foreigners, 9/0 1800s).
_RRN = re.compile(r"(?<!\d)(\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))\s?[-–]?\s?([1-8]\d{6})(?!\d)")
# Korean phone numbers: mobile 010/011/016-019, Seoul 02, regional 031-064, internet phone 070,
# in 0XX-XXXX-XXXX, with dots or spaces, or from abroad as +82 10-...
_PHONE = re.compile(
    r"(?<![\d+])(?:\+82[\s.-]?(?:\(0\))?|0)(?:1[016789]|2|[3-6][1-5]|70)[\s.)-]?\d{3,4}[\s.-]?\d{4}(?!\d)"
)
# Card numbers: 13-19 digits in groups (4-4-4-4, 4-6-5, ...) checked with the Luhn sum so that
# order and account numbers of the same shape are not masked.
_CARD = re.compile(r"(?<![\d-])(?<!\d[.,])\d{4}(?:[ -]?\d{2,6}){2,4}(?!\d|-|[.,]\d)")

PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "rrn": "[RRN]", "card": "[CARD]"}


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass
class CleanConfig:
    """Which rules run and their thresholds. Defaults suit Korean web/news/wiki text."""

    nfc: bool = True  # compose NFD Hangul jamo (macOS file names, some crawls) into syllables
    remove_invisible: bool = True  # control, zero-width and bidi characters
    strip_html: bool = True  # tags, comments, script/style bodies, entities
    normalize_whitespace: bool = True  # odd spaces -> ' ', runs collapsed, at most one blank line
    mask_pii: bool = True  # e-mail, phone, 주민등록번호, card numbers -> typed placeholders
    min_chars: int = 20  # drop documents shorter than this many characters after cleaning (0 = off)
    min_hangul_ratio: float = 0.0  # Hangul / letters below this drops the document (0 = off; set per source)
    max_symbol_digit_ratio: float = 0.5  # (digits + symbols) / non-space characters above this drops (1 = off)
    max_repeated_line_ratio: float = 0.3  # duplicated lines / lines above this drops (1 = off)
    max_repeated_ngram_ratio: float = 0.3  # duplicated word n-grams / n-grams above this drops (1 = off)
    ngram_size: int = 3  # words per n-gram for the repetition filter

    def __post_init__(self):
        for name in ("min_hangul_ratio", "max_symbol_digit_ratio", "max_repeated_line_ratio", "max_repeated_ngram_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"cleaning {name}={v} is outside [0, 1]; give a fraction")
        if self.ngram_size < 1 or self.min_chars < 0:
            raise ValueError("cleaning ngram_size must be >= 1 and min_chars >= 0")

    @classmethod
    def from_dict(cls, d: dict | None) -> "CleanConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown cleaning option(s) {unknown}; valid ones are {sorted(known)}")
        for f in fields(cls):  # YAML gives strings for quoted or mistyped values: name them, not a TypeError
            if f.name in d:
                v, kind = d[f.name], type(f.default)
                ok = isinstance(v, bool) if kind is bool else (
                    isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else
                    isinstance(v, int) and not isinstance(v, bool))
                if not ok:
                    raise ValueError(f"cleaning option {f.name}={v!r} must be {kind.__name__} "
                                     f"(default {f.default!r})")
        return cls(**d)


class Cleaner:
    """`cleaner(text)` returns (cleaned text, None) or (None, reason it was dropped); `counts` holds
    per-rule totals for the report."""

    def __init__(self, config: CleanConfig | None = None):
        self.config = config or CleanConfig()
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> tuple[str | None, str | None]:
        c = self.config
        if c.nfc:
            text = self._count("nfc", text, unicodedata.normalize("NFC", text) if not unicodedata.is_normalized("NFC", text) else text)
        if c.remove_invisible:
            text = self._count("invisible_chars", text, _INVISIBLE.sub("", text))
        if c.strip_html and ("<" in text or "&" in text):
            text = self._count("html", text, strip_html(text))
        if c.mask_pii:
            text = self.mask_pii(text)
        if c.normalize_whitespace:
            text = self._count("whitespace", text, normalize_whitespace(text))
        reason = self.filter_reason(text)
        return (None, reason) if reason else (text, None)

    def _count(self, rule: str, before: str, after: str) -> str:
        if after != before:
            self.counts[rule] += 1
        return after

    def mask_pii(self, text: str) -> str:
        if not any(ch.isdigit() for ch in text) and "@" not in text:
            return text
        text, n = _RRN.subn(PLACEHOLDERS["rrn"], text)
        if n:
            self.counts["pii_rrn"] += n

        def card(m: re.Match) -> str:
            digits = re.sub(r"\D", "", m.group(0))
            if 13 <= len(digits) <= 19 and _luhn_ok(digits):
                self.counts["pii_card"] += 1
                return PLACEHOLDERS["card"]
            return m.group(0)

        text = _CARD.sub(card, text)
        text, n = _PHONE.subn(PLACEHOLDERS["phone"], text)
        if n:
            self.counts["pii_phone"] += n
        text, n = _EMAIL.subn(PLACEHOLDERS["email"], text)
        if n:
            self.counts["pii_email"] += n
        return text

    def filter_reason(self, text: str) -> str | None:
        """The name of the first filter that drops `text`, or None to keep it."""
        c = self.config
        if len(text.strip()) < max(c.min_chars, 1):
            return "too_short" if text.strip() else "empty"
        if c.min_hangul_ratio > 0 and hangul_ratio(text) < c.min_hangul_ratio:
            return "low_hangul_ratio"
        if c.max_symbol_digit_ratio < 1 and symbol_digit_ratio(text) > c.max_symbol_digit_ratio:
            return "high_symbol_digit_ratio"
        if c.max_repeated_line_ratio < 1 and repeated_line_ratio(text) > c.max_repeated_line_ratio:
            return "repeated_lines"
        if c.max_repeated_ngram_ratio < 1 and repeated_ngram_ratio(text, c.ngram_size) > c.max_repeated_ngram_ratio:
            return "repeated_ngrams"
        return None


def strip_html(text: str) -> str:
    text = _SCRIPT_STYLE.sub(" ", text)
    text = _HTML_COMMENT.sub(" ", text)
    text = _BLOCK_TAG.sub("\n", text)  # <br>, <p> ... separated lines; keep them apart
    text = _HTML_TAG.sub(" ", text)
    return _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n")
    text = _ODD_SPACE.sub(" ", text)
    text = _SPACE_RUN.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    text = _NEWLINE_RUN.sub("\n\n", text)
    return text.strip()


def _is_hangul(ch: str) -> bool:
    o = ord(ch)
    return 0xAC00 <= o <= 0xD7A3 or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F or 0xA960 <= o <= 0xA97F or 0xD7B0 <= o <= 0xD7FF


def hangul_ratio(text: str) -> float:
    """Hangul characters over letters (digits, spaces and punctuation count for neither)."""
    letters = hangul = 0
    for ch in text:
        if ch.isalpha():
            letters += 1
            hangul += _is_hangul(ch)
    return hangul / letters if letters else 0.0


def symbol_digit_ratio(text: str) -> float:
    """Characters that are neither letters nor spaces, over all non-space characters."""
    visible = symbols = 0
    for ch in text:
        if not ch.isspace():
            visible += 1
            symbols += not ch.isalpha()
    return symbols / visible if visible else 0.0


def repeated_line_ratio(text: str) -> float:
    """Lines that repeat an earlier line of the document, over non-blank lines."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def repeated_ngram_ratio(text: str, n: int = 3) -> float:
    """Word n-grams that repeat an earlier n-gram, over all n-grams (0 for fewer than 2n words)."""
    words = text.split()
    if len(words) < 2 * n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    return (len(grams) - len(set(grams))) / len(grams)
