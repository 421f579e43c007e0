"""A real Korean ↔ English translation task that installs offline: the GIMP manual in Debian's
`gimp-help-ko` and `gimp-help-en`, built from the same DocBook sources, so a page has the same
paragraphs in the same order in both languages.

Pairs: for every page present in both packages with the same number of paragraphs (pages whose counts
differ are dropped and counted), paragraph i of the Korean page is paired with paragraph i of the
English one, and the pair is kept only if it verifies as a translation:
- the Korean side is translated (Hangul is at least `MIN_HANGUL_SHARE` of its letters) and the
  English side holds no Hangul;
- both sides carry the same numbers (section, figure and shortcut numbers survive translation, so a
  shifted alignment shows up here);
- the length ratio Korean/English characters lies in `LENGTH_RATIO`;
- the English side has at least `MIN_WORDS` words and at most `MAX_CHARS` characters.
Repeated pairs (menu names, "Note"/"참고") are kept once.

Split by page (`megakor.tasks.heldout.is_translation_heldout_page`): held-out pages are also dropped
from the default job's Korean text, so neither continued-pretraining stage nor fine-tuning ever
trains on them; a held-out pair whose Korean or English paragraph also appears on a training page is
dropped too. Each pair gives one example per direction (chat `messages`, prompt in `PROMPTS`).

    python launch/translation_task.py --out runs/sft/task     # writes train.jsonl, heldout.{ko-en,en-ko}.jsonl
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

from megakor.corpora import cache_dir, fetch_deb, hangul_count, html_paragraphs
from megakor.tasks.heldout import is_translation_heldout_page

TASK_VERSION = 1  # bump when pairing or filtering changes, so task files are rebuilt
MIN_HANGUL_SHARE = 0.3  # Hangul letters / (Hangul + Latin letters) of a Korean paragraph
LENGTH_RATIO = (0.15, 1.5)  # Korean characters / English characters
MIN_WORDS = 3
MAX_CHARS = 400  # English characters: examples stay within a short train.seq_len
PROMPTS = {
    "ko-en": "Translate the following Korean text into English.\n\n{text}",
    "en-ko": "Translate the following English text into Korean.\n\n{text}",
}
_LATIN = re.compile(r"[A-Za-z]")
_NUMBER = re.compile(r"\d+")


def _manual(cache: Path, lang: str) -> Path:
    return fetch_deb(f"gimp-help-{lang}", cache) / "usr/share/gimp/2.0/help" / lang


def verify_pair(ko: str, en: str) -> str | None:
    """None when (ko, en) verifies as a translation pair, else the reason it does not."""
    hangul = hangul_count(ko)
    if not hangul or hangul < MIN_HANGUL_SHARE * (hangul + len(_LATIN.findall(ko))):
        return "untranslated"
    if hangul_count(en):
        return "hangul_in_english"
    if sorted(_NUMBER.findall(ko)) != sorted(_NUMBER.findall(en)):
        return "numbers_differ"
    if not LENGTH_RATIO[0] <= len(ko) / max(len(en), 1) <= LENGTH_RATIO[1]:
        return "length_ratio"
    if len(en.split()) < MIN_WORDS:
        return "too_short"
    if len(en) > MAX_CHARS:
        return "too_long"
    return None


def gimp_pairs(cache: str | os.PathLike | None = None) -> tuple[list[dict], Counter]:
    """([{"id", "page", "ko", "en", "heldout"}], counts of dropped pairs and pages by reason)."""
    root = cache_dir(cache)
    ko_dir, en_dir = _manual(root, "ko"), _manual(root, "en")
    counts: Counter = Counter()
    pages: dict[str, list[tuple[str, str]]] = {}
    for page in sorted(p.name for p in ko_dir.glob("*.html")):
        if not (en_dir / page).is_file():
            counts["page_missing_in_en"] += 1
            continue
        ko = html_paragraphs((ko_dir / page).read_text(encoding="utf-8", errors="replace"))
        en = html_paragraphs((en_dir / page).read_text(encoding="utf-8", errors="replace"))
        if len(ko) != len(en):
            counts["page_paragraph_counts_differ"] += 1
            continue
        pages[page] = list(zip(ko, en))
    seen_train = {text for page, paired in pages.items() if not is_translation_heldout_page(page)
                  for pair in paired for text in pair}
    pairs, seen = [], set()
    for page, paired in pages.items():
        heldout = is_translation_heldout_page(page)
        for i, (ko, en) in enumerate(paired):
            if ko == en:
                continue  # untranslated paragraph (most of gimp-help-ko is still English)
            reason = verify_pair(ko, en)
            if reason is None and (ko, en) in seen:
                reason = "repeated"
            if reason is None and heldout and (ko in seen_train or en in seen_train):
                reason = "heldout_text_on_a_training_page"
            if reason is not None:
                counts[reason] += 1
                continue
            seen.add((ko, en))
            pairs.append({"id": f"gimp-help/{page}#{i}", "page": page, "ko": ko, "en": en, "heldout": heldout})
    return pairs, counts


def example(pair: dict, direction: str) -> dict:
    """One chat example: the user asks for a translation, the assistant gives the reference."""
    source, target = direction.split("-")
    return {"id": f"{pair['id']}:{direction}", "direction": direction,
            "messages": [{"role": "user", "content": PROMPTS[direction].format(text=pair[source])},
                         {"role": "assistant", "content": pair[target]}]}


def _write(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_translation_task(out: str | os.PathLike, cache: str | os.PathLike | None = None, seed: int = 0) -> dict:
    """Write `train.jsonl` (both directions, shuffled), `heldout.ko-en.jsonl`, `heldout.en-ko.jsonl` and
    `report.json` under `out`; returns the report. Cheap when the files exist for this TASK_VERSION."""
    out = Path(out)
    report_path = out / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("version") == TASK_VERSION and all((out / f).is_file() for f in report["files"].values()):
            return report
    out.mkdir(parents=True, exist_ok=True)
    pairs, counts = gimp_pairs(cache)
    train = [example(p, d) for p in pairs if not p["heldout"] for d in PROMPTS]
    random.Random(seed).shuffle(train)
    files = {"train": "train.jsonl"}
    _write(out / "train.jsonl", train)
    for d in PROMPTS:
        files[f"heldout.{d}"] = f"heldout.{d}.jsonl"
        _write(out / files[f"heldout.{d}"], [example(p, d) for p in pairs if p["heldout"]])
    report = {
        "version": TASK_VERSION,
        "pairs": {"train": sum(not p["heldout"] for p in pairs), "heldout": sum(p["heldout"] for p in pairs)},
        "pages": {"train": len({p["page"] for p in pairs if not p["heldout"]}),
                  "heldout": len({p["page"] for p in pairs if p["heldout"]})},
        "dropped": dict(sorted(counts.items())),
        "files": files,
    }
    report_path.write_text(json.dumps(report, indent=1))
    return report
