"""Extend a base BPE tokenizer with Korean tokens, keeping every existing token id.

How it works, and why this way:
- A BPE tokenizer encodes a word by applying its merges in rank order. Merges appended after all of
  the base's merges can only fire once no base merge applies, that is, on the base tokenizer's own
  segmentation of the word. So the new merges are learned on exactly that segmentation: each Korean
  word is encoded with the base model, its base tokens become the "characters" handed to the
  `tokenizers` BPE trainer, and the merges it learns are translated back into base-token strings.
  The merges learned this way fire when encoding text like the corpus; a Korean BPE trained from
  scratch would learn merges whose inputs the base never produces, and tokens nothing reaches.
- A new merge is kept only if its result cannot occur in text without Hangul (a Hangul character,
  or a UTF-8 prefix every completion of which is Hangul). Text with no Hangul therefore never
  triggers a new merge and encodes to exactly the base ids.
- Step 1 makes every frequent Hangul syllable one token. SentencePiece-style BPE with byte
  fallback (Llama 2, Mistral) spells a missing syllable as 3 byte tokens that are never merged, so
  the syllable is added to the vocabulary as a character. Byte-level BPE (Llama 3, Qwen2,
  SmolLM2/GPT-2) spells it as 2-3 byte pieces, so merges composing it left to right are appended.
  Step 2 learns merges on top with the trainer. New tokens of byte-level bases are written in the
  byte alphabet.
- New ids start at the base's full size (model vocabulary plus added/special tokens, e.g. 128,256
  for Llama 3), so all old ids, special ones included, stay valid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece_bpe"

# Hangul syllables, jamo, compatibility jamo, jamo extensions A/B, halfwidth jamo, tone marks,
# parenthesized and circled Hangul: every code point whose Unicode name says HANGUL or KOREAN CHARACTER.
_HANGUL_RANGES = ((0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F),
                  (0xD7B0, 0xD7FF), (0xFFA0, 0xFFDC), (0x302E, 0x302F), (0x3200, 0x321E), (0x3260, 0x327E))
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Base token ids become characters for the trainer from U+10000 up: none of those is whitespace,
# so the trainer's whitespace split separates words and nothing else.
_SYMBOL_BASE = 0x10000
# Files copied from the base directory. tokenizer.model (SentencePiece) is left out on purpose:
# a loader that prefers it would silently drop the new tokens.
_COPIED_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json")


def normalize_korean(text: str) -> str:
    """Text as the tokenizer is trained on it: NFC (so a syllable is one character, not jamo), no
    zero-width characters, runs of horizontal whitespace as one space, at most one blank line.
    The data pipeline's cleaner (`megakor.data.clean`) does this and more; this is the minimum."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub("[\u200b\u200c\u200d\u2060\ufeff]", "", text)
    text = re.sub(r"[^\S\n]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


_HANGUL_CHAR = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _HANGUL_RANGES) + "]")


def is_hangul(char: str) -> bool:
    return _HANGUL_CHAR.fullmatch(char) is not None


def contains_hangul(text: str) -> bool:
    return _HANGUL_CHAR.search(text) is not None


def bytes_imply_hangul(data: bytes) -> bool:
    """Whether every UTF-8 text containing `data` contains a Hangul character: `data` holds a whole
    Hangul character, or ends in a partial character all of whose completions are Hangul. Leading
    continuation bytes (the tail of a character begun before) prove nothing."""
    i = 0
    while i < len(data) and 0x80 <= data[i] < 0xC0:
        i += 1
    while i < len(data):
        lead = data[i]
        width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        chunk = data[i:i + width]
        if any(not 0x80 <= b < 0xC0 for b in chunk[1:]):
            i += 1  # malformed; cannot come from valid text at this position
            continue
        payload = lead & (0x7F, 0x1F, 0x0F, 0x07)[width - 1]
        lo = hi = payload
        for k in range(1, width):
            known = chunk[k] & 0x3F if k < len(chunk) else None
            lo = (lo << 6) | (known if known is not None else 0)
            hi = (hi << 6) | (known if known is not None else 0x3F)
        if any(a <= lo and hi <= b for a, b in _HANGUL_RANGES):
            return True
        i += width
    return False


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def byte_level_to_bytes(token: str) -> bytes:
    """The bytes a byte-level BPE token stands for."""
    return bytes(_CHAR_TO_BYTE[c] for c in token)


# ---------------------------------------------------------------- loading and inspecting


def as_backend(tokenizer) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a tokenizer directory, a tokenizer.json path, a transformers
    fast tokenizer or a `tokenizers.Tokenizer`."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer.backend_tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; pass a Hugging Face tokenizer directory "
                                    "with a tokenizer.json (or the tokenizer.json itself)")
        return Tokenizer.from_file(str(file))
    raise TypeError(f"cannot use a {type(tokenizer).__name__} as a tokenizer; pass a path, a "
                    "transformers fast tokenizer or a tokenizers.Tokenizer")


def full_vocab_size(tokenizer) -> int:
    """One past the highest id, added/special tokens included: where new ids begin."""
    backend = as_backend(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    if backend.id_to_token(size - 1) is not None and backend.id_to_token(size) is None \
            and all(index < size for index in added):
        return size  # ids are contiguous, the usual case; get_vocab would build a 100k-entry dict
    return max(backend.get_vocab(with_added_tokens=True).values()) + 1


def _has_component(node, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_component(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_component(v, kind) for v in node)
    return False


def tokenizer_kind(tokenizer_json: dict) -> str:
    """BYTE_LEVEL or SENTENCEPIECE for the two BPE flavours we extend; a clear error otherwise."""
    model_type = tokenizer_json.get("model", {}).get("type")
    if model_type != "BPE":
        raise ValueError(f"the base tokenizer's model is {model_type}, not BPE; vocabulary extension "
                         "supports byte-level BPE (Llama 3, Qwen2) and byte-fallback BPE (Llama 2, Mistral)")
    if _has_component(tokenizer_json.get("pre_tokenizer"), "ByteLevel"):
        return BYTE_LEVEL
    if tokenizer_json["model"].get("byte_fallback"):
        return SENTENCEPIECE
    raise ValueError("the base BPE tokenizer is neither byte-level nor byte-fallback, so new Korean "
                     "tokens would have no base spelling; use a Llama 2/3, Mistral or Qwen2 style tokenizer")


def token_implies_hangul(token: str, kind: str) -> bool:
    """Whether a vocabulary entry can only match text that contains Hangul."""
    if kind == BYTE_LEVEL:
        return bytes_imply_hangul(byte_level_to_bytes(token))
    return contains_hangul(token)


# ---------------------------------------------------------------- words as the base sees them


def count_words(base: Tokenizer, kind: str, texts: Iterable[str], normalize=normalize_korean) -> Counter:
    """Frequencies of the base's pre-tokenized words that contain Hangul, after `normalize`. For
    SentencePiece-style tokenizers, whose pre-tokenizer is often absent, a word is a run starting at
    "▁" (the space marker), since no base merge crosses one."""
    counts: Counter = Counter()
    for text in texts:
        text = normalize(text)
        if not contains_hangul(text):
            continue
        if base.normalizer is not None:
            text = base.normalizer.normalize_str(text)
        # Offsets point into `text`, so the Hangul test reads the text, not byte-level spellings.
        pieces = base.pre_tokenizer.pre_tokenize_str(text) if base.pre_tokenizer else [(text, (0, len(text)))]
        for piece, (start, end) in pieces:
            if not contains_hangul(text[start:end]):
                continue
            if kind == SENTENCEPIECE:
                counts.update(w for w in re.findall("▁*[^▁]+|▁+", piece) if contains_hangul(w))
            else:
                counts[piece] += 1
    return counts


def _segment_sentencepiece(tokenizer: Tokenizer, counts: Counter) -> Counter:
    """Each word as the model spells it, cut at byte-fallback tokens, which must never be merged
    (they spell characters the vocabulary lacks): {tuple of token strings: frequency}."""
    runs: Counter = Counter()
    for word, n in counts.items():
        current: list[str] = []
        for token in tokenizer.model.tokenize(word) + [None]:
            if token is None or _BYTE_FALLBACK.fullmatch(token.value):
                if len(current) > 1:
                    runs[tuple(current)] += n
                current = []
            else:
                current.append(token.value)
    return runs


def _ends_on_character(data: bytes) -> bool:
    """Whether bytes that begin on a character boundary also end on one."""
    tail = len(data) - len(data.rstrip(bytes(range(0x80, 0xC0))))
    if tail == len(data):
        return tail == 0
    lead = data[len(data) - tail - 1]
    return tail == (0 if lead < 0x80 else 1 if lead < 0xE0 else 2 if lead < 0xF0 else 3)


def _compose_characters(base: Tokenizer, counts: Counter, budget: int, min_frequency: int,
                        known: set, existing_merges) -> tuple[list[str], list[tuple[str, str]], Counter]:
    """Byte-level step 1, the counterpart of adding missing syllables to a byte-fallback vocabulary.

    A base trained on little Korean spells a syllable as 2-3 byte pieces. Left to itself, the trainer
    would first merge the frequent continuation-byte pairs inside syllables, which occur in Chinese
    and other scripts too, so those merges (and everything built on them) would have to be dropped.
    Instead, each frequent multi-piece character group is composed left to right ((lead, byte),
    byte), every step of which is Hangul-bound, and handed to the trainer as one symbol.
    Returns (new tokens, their merges, words as tuples of token strings with frequencies); groups
    that cannot or need not be composed cut the words, so the trainer never merges inside them."""
    segmented: dict[str, list[tuple[str, ...]]] = {}
    group_counts: Counter = Counter()
    for word, n in counts.items():
        groups, current, data = [], [], b""
        for token in base.model.tokenize(word):
            current.append(token.value)
            data += byte_level_to_bytes(token.value)
            if _ends_on_character(data):
                groups.append(tuple(current))
                current, data = [], b""
        if current:
            groups.append(tuple(current))
        segmented[word] = groups
        for group in groups:
            if len(group) > 1:
                group_counts[group] += n

    new_tokens, merges, composed = [], [], {}
    available, added_merges = set(known), set()
    for group, n in sorted(group_counts.items(), key=lambda item: (-item[1], item[0])):
        if n < min_frequency:
            break
        steps, fresh, prefix = [], [], group[0]
        for piece in group[1:]:
            merged = prefix + piece
            if merged not in available and not bytes_imply_hangul(byte_level_to_bytes(merged)):
                break
            steps.append((prefix, piece))
            if merged not in available and merged not in fresh:
                fresh.append(merged)
            prefix = merged
        else:
            if len(new_tokens) + len(fresh) > budget:
                continue
            new_tokens += fresh
            available.update(fresh)
            for step in steps:
                if step not in existing_merges and step not in added_merges:
                    merges.append(step)
                    added_merges.add(step)
            composed[group] = prefix

    words: Counter = Counter()
    for word, n in counts.items():
        current = []
        for group in segmented[word] + [None]:
            if group is not None and (len(group) == 1 or group in composed):
                current.append(group[0] if len(group) == 1 else composed[group])
                continue
            if len(current) > 1:
                words[tuple(current)] += n
            current = []
    return new_tokens, merges, words


@dataclass
class Extension:
    """What is added to a base tokenizer: new vocabulary entries in id order and appended merges."""

    kind: str
    base_size: int  # first new id
    new_tokens: list[str] = field(default_factory=list)
    merges: list[tuple[str, str]] = field(default_factory=list)


def apply_extension(base_json: dict, extension: Extension) -> dict:
    """A copy of the base tokenizer.json dict with the new entries and merges appended."""
    # Copy only what changes: the vocabulary and merge list (a deep copy of Llama 3's costs seconds).
    out = {**base_json, "model": {**base_json["model"], "vocab": dict(base_json["model"]["vocab"]),
                                  "merges": list(base_json["model"]["merges"])}}
    vocab, merges = out["model"]["vocab"], out["model"]["merges"]
    # When loading, `tokenizers` numbers an added token that the model vocabulary lacks as
    # "model size + its index", which is right for the base (Llama 3's specials follow its 128,000
    # BPE entries) but would move them once the model vocabulary grows. Listing them in the model
    # vocabulary at their own ids pins them; no merge produces them, so encoding is unchanged.
    for added in out.get("added_tokens", []):
        if vocab.setdefault(added["content"], added["id"]) != added["id"]:
            raise ValueError(f"added token {added['content']!r} has id {added['id']} but the model "
                             f"vocabulary gives it {vocab[added['content']]}; repair the base tokenizer.json")
    for offset, token in enumerate(extension.new_tokens):
        if token in vocab:
            raise ValueError(f"new token {token!r} is already in the base vocabulary; "
                             "build the extension from this base tokenizer")
        vocab[token] = extension.base_size + offset
    # Keep the base file's merge spelling ("a b" strings or [a, b] pairs) unless a token has a space.
    as_pairs = bool(merges) and not isinstance(merges[0], str)
    as_pairs = as_pairs or any(" " in a or " " in b for a, b in extension.merges)
    if as_pairs:
        merges[:] = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    merges.extend([list(m) for m in extension.merges] if as_pairs else [f"{a} {b}" for a, b in extension.merges])
    return out


def _new_characters(base_json: dict, counts: Counter, budget: int, min_frequency: int) -> list[str]:
    """Hangul characters the byte-fallback base lacks, most frequent first."""
    vocab = base_json["model"]["vocab"]
    chars: Counter = Counter()
    for word, n in counts.items():
        for c in word:
            if is_hangul(c) and c not in vocab:
                chars[c] += n
    ranked = sorted((c for c, n in chars.items() if n >= min_frequency), key=lambda c: (-chars[c], c))
    return ranked[:budget]


def train_extension(base_path, texts: Iterable[str], num_new_tokens: int, min_frequency: int = 2,
                    normalize=normalize_korean, base_json: dict | None = None) -> Extension:
    """Learn up to `num_new_tokens` Korean tokens and their merges on top of the base tokenizer.
    `texts` are raw documents; `min_frequency` is the fewest occurrences a new character or merge
    needs in the corpus; `base_json` is the base tokenizer.json, if the caller has it parsed already."""
    if num_new_tokens < 1:
        raise ValueError(f"num_new_tokens={num_new_tokens}; ask for at least 1 new token (e.g. 8000)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency}; use 1 or more (2 is usual)")
    base_json = base_json if base_json is not None else _read_json(base_path)
    kind = tokenizer_kind(base_json)
    base = as_backend(base_path)
    extension = Extension(kind, full_vocab_size(base))
    counts = count_words(base, kind, texts, normalize)
    if not counts:
        raise ValueError("the corpus holds no Hangul words; pass Korean JSONL or text files as --corpus")

    # Step 1: every frequent Hangul character becomes one token (see _compose_characters).
    known = set(base_json["model"]["vocab"]) | {t["content"] for t in base_json.get("added_tokens", [])}
    existing_merges = _MergeSet(base_json["model"]["merges"])
    if kind == SENTENCEPIECE:
        extension.new_tokens = _new_characters(base_json, counts, num_new_tokens, min_frequency)
        current = Tokenizer.from_str(json.dumps(apply_extension(base_json, extension)))
        words = _segment_sentencepiece(current, counts)
    else:
        extension.new_tokens, extension.merges, words = _compose_characters(
            base, counts, num_new_tokens, min_frequency, known, existing_merges)

    # Step 2: BPE on top, each token string handed to the trainer as one character.
    strings = sorted({token for word in words for token in word})
    symbol = {token: chr(_SYMBOL_BASE + i) for i, token in enumerate(strings)}
    symbol_counts: Counter = Counter()
    for word, n in words.items():
        symbol_counts["".join(symbol[t] for t in word)] += n
    available = known | set(extension.new_tokens)
    skip = _MergeSet(base_json["model"]["merges"], extra=extension.merges)
    wanted = num_new_tokens - len(extension.new_tokens)
    request = int(wanted * 1.25) + 64
    while wanted > 0 and symbol_counts:
        learned, exhausted = _learn_merges(symbol_counts, request, min_frequency)
        tokens, merges = _select(learned, strings, available, skip, kind, wanted)
        if len(tokens) >= wanted or exhausted:
            extension.new_tokens += tokens
            extension.merges += merges
            break
        request *= 2  # too many learned merges were filtered out; learn more
    return extension


def _learn_merges(symbol_counts: Counter, num_merges: int, min_frequency: int):
    """Run the `tokenizers` BPE trainer on symbol words; returns (merges as symbol-string pairs,
    whether the trainer ran out of pairs seen `min_frequency` times before `num_merges`)."""
    alphabet = {c for word in symbol_counts for c in word}
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, min_frequency=min_frequency,
                                  show_progress=False, special_tokens=[], limit_alphabet=len(alphabet))
    # The trainer counts words itself; repeating a word n times is how a frequency is handed over
    # (at most 4,096 times per string, to keep strings small for very frequent words).
    sequences = (" ".join([w] * min(n - start, 4096)) for w, n in symbol_counts.items()
                 for start in range(0, n, 4096))
    model.train_from_iterator(sequences, trainer=trainer)
    merges = json.loads(model.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    return merges, len(merges) < num_merges


class _MergeSet:
    """Membership test for the base's merges (plus `extra` pairs), kept in the file's own spelling
    ("a b" or [a, b]) so that 280,000 merges need not be split into pairs."""

    def __init__(self, merges: list, extra=()):
        self.as_strings = bool(merges) and isinstance(merges[0], str)
        self.items = set(merges) if self.as_strings else {tuple(m) for m in merges}
        self.extra = set(extra)

    def __contains__(self, pair: tuple[str, str]) -> bool:
        return pair in self.extra or (f"{pair[0]} {pair[1]}" if self.as_strings else pair) in self.items


def _select(learned, strings, available, existing_merges, kind, wanted):
    """Translate learned symbol merges into token-string merges, in order, keeping those whose
    result implies Hangul and whose inputs exist, until `wanted` new tokens exist."""
    available = set(available)
    tokens, merges, seen = [], [], set()

    def spell(symbols: str) -> str:
        return "".join(strings[ord(c) - _SYMBOL_BASE] for c in symbols)

    for a, b in learned:
        left, right = spell(a), spell(b)
        merged = left + right
        if left not in available or right not in available or (left, right) in seen \
                or (left, right) in existing_merges:
            continue  # an input was filtered out earlier, or the merge exists already
        if not token_implies_hangul(merged, kind):
            continue  # would change how text without Hangul encodes
        if merged not in available:
            if len(tokens) == wanted:
                break
            tokens.append(merged)
            available.add(merged)
        merges.append((left, right))
        seen.add((left, right))
    return tokens, merges


# ---------------------------------------------------------------- files


def _read_json(base_path) -> dict:
    path = Path(base_path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; pass a Hugging Face tokenizer directory with a "
                                "tokenizer.json (or the tokenizer.json itself) as --base")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def save_extended(base_path, extension: Extension, out_dir, base_json: dict | None = None) -> Path:
    """Write a complete Hugging Face tokenizer directory: the extended tokenizer.json, and the base's
    tokenizer_config.json / special_tokens_map.json / chat template unchanged (or, for a bare
    tokenizer.json base, a minimal tokenizer_config.json naming the same BOS/EOS)."""
    from megakor.tokenizer import load_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_json = base_json if base_json is not None else _read_json(base_path)
    # Written as JSON directly: parsing and re-saving through `tokenizers` doubles the time for
    # Llama 3, and every test and caller loads the result anyway.
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(apply_extension(base_json, extension), f, ensure_ascii=False)
    base_dir = Path(base_path) if Path(base_path).is_dir() else Path(base_path).parent
    copied = [name for name in _COPIED_FILES if (base_dir / name).is_file()]
    for name in copied:
        shutil.copyfile(base_dir / name, out / name)
    if "tokenizer_config.json" not in copied:
        base = load_tokenizer(base_path)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": base.bos_token,
                  "eos_token": base.eos_token, "clean_up_tokenization_spaces": False}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    summary = {"base": str(base_path), "kind": extension.kind, "base_vocab_size": extension.base_size,
               "new_tokens": len(extension.new_tokens), "new_merges": len(extension.merges),
               "vocab_size": extension.base_size + len(extension.new_tokens)}
    (out / "megakor_extension.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def extend_tokenizer(base_path, texts: Iterable[str], num_new_tokens: int, out_dir,
                     min_frequency: int = 2, normalize=normalize_korean) -> Extension:
    """Train the extension on `texts` and write the extended tokenizer directory to `out_dir`."""
    base_json = _read_json(base_path)
    extension = train_extension(base_path, texts, num_new_tokens, min_frequency, normalize, base_json)
    save_extended(base_path, extension, out_dir, base_json)
    return extension
