"""Korean-like text at any size, for preprocessing benchmarks: sentences of the offline corpora that
`python -m megakor.corpora` prepares (~/.cache/megakor/corpora/*/ko*.jsonl, from the konlpy wheel and
Debian packages), sampled into documents and mutated (a few syllables replaced at random, a document
number), so documents are distinct and near-duplicate-free by construction; optionally with planted
exact copies (re-spaced) and near copies (one word replaced) of earlier documents in later files.

    python bench/korean_corpus.py OUT_DIR --mb 200 --files 8 --plant 1000
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
from pathlib import Path


def korean_sentences(cache: str | None = None) -> list[str]:
    root = Path(cache or os.environ.get("MEGAKOR_CACHE") or Path.home() / ".cache" / "megakor") / "corpora"
    files = sorted(glob.glob(str(root / "*" / "ko*.jsonl")))
    if not files:
        raise SystemExit(f"no Korean corpus under {root}; run `python -m megakor.corpora` first (offline: konlpy wheel "
                         "and Debian packages)")
    seen, sentences = set(), []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                for s in re.split(r"(?<=[.!?다])\s+|\n+", json.loads(line)["text"]):
                    s = s.strip()
                    if len(s) >= 12 and s not in seen:
                        seen.add(s)
                        sentences.append(s)
    return sentences


def _mutate(text: str, rng: random.Random, edits: int) -> str:
    chars = list(text)
    for _ in range(edits):
        i = rng.randrange(len(chars))
        if "가" <= chars[i] <= "힣":
            chars[i] = chr(0xAC00 + rng.randrange(11172))
    return "".join(chars)


def near_copy(text: str, rng: random.Random) -> str:
    """One word replaced: a character 5-gram Jaccard of ~0.98 for documents of ~100 words."""
    words = text.split(" ")
    i = rng.randrange(len(words))
    words[i] = "서울특별시" if words[i] != "서울특별시" else "부산광역시"
    return " ".join(words)


def exact_copy(text: str) -> str:
    """Equal after dedup's normalisation (whitespace runs collapsed), not byte-equal."""
    return text.replace(" ", "  ", 3)


def build(out_dir: Path, megabytes: float, files: int = 8, plant: int = 0, seed: int = 0) -> dict:
    """`files` JSONL files of together ~`megabytes` MB. With `plant`, that many exact and that many near
    copies of documents of the first half of the files are written into the second half. Returns
    {"files": [...], "planted": [[path, line, reason, original path, original line], ...], "documents": n}."""
    rng = random.Random(seed)
    sentences = korean_sentences()
    out_dir.mkdir(parents=True, exist_ok=True)
    per_file = int(megabytes * (1 << 20) / files)
    paths = [out_dir / f"ko-{i:02d}.jsonl" for i in range(files)]
    first_half = max(1, files // 2)
    # Where the copies go: (file, document number in that file) -> (reason, source file, source document).
    sources: list[tuple[int, int]] = []
    planted_at: dict[int, list[tuple[int, str]]] = {}
    planted, kept_texts = [], {}
    docs_total = 0
    for f, path in enumerate(paths):
        size, line = 0, 0
        pending = sorted(planted_at.get(f, []))
        with open(path, "w", encoding="utf-8") as out:
            while size < per_file:
                line += 1
                if pending and pending[0][0] <= line:
                    _, reason, src = pending.pop(0)
                    original = kept_texts[src]
                    text = exact_copy(original) if reason == "exact_duplicate" else near_copy(original, rng)
                    planted.append([str(path), line, reason, str(paths[src[0]]), src[1]])
                else:
                    body = " ".join(rng.sample(sentences, rng.randint(8, 30)))
                    text = _mutate(f"문서 {docs_total + 1}번. {body}", rng, 4)
                    if f < first_half and len(sources) < 4 * plant and rng.random() < 0.2:
                        sources.append((f, line))
                        kept_texts[(f, line)] = text
                record = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(record)
                size += len(record.encode("utf-8"))
                docs_total += 1
        if f == first_half - 1 and plant:  # schedule the copies into the second half, spread over its files
            picks = rng.sample(sources, min(2 * plant, len(sources)))
            for k, src in enumerate(picks):
                target = first_half + rng.randrange(files - first_half)
                reason = "exact_duplicate" if k % 2 == 0 else "near_duplicate"
                planted_at.setdefault(target, []).append((rng.randrange(1, 4 * plant // max(files - first_half, 1) + 2),
                                                           reason, src))
    return {"files": [str(p) for p in paths], "planted": planted, "documents": docs_total,
            "bytes": sum(p.stat().st_size for p in paths)}


def cached_corpus(work: Path, gb: float, plant: int = 0) -> dict:
    """`build` into WORK/corpus-<MB>mb-plant<N>/ unless it is there already; returns its planted.json."""
    import time

    d = Path(work) / f"corpus-{int(gb * 1000)}mb-plant{plant}"
    info_path = d / "planted.json"
    if not info_path.exists():
        t0 = time.time()
        info = build(d, gb * 1e9 / (1 << 20), files=8, plant=plant)
        info_path.write_text(json.dumps(info, ensure_ascii=False))
        print(f"built {d}: {info['bytes'] / 1e9:.2f} GB, {info['documents']} documents, {len(info['planted'])} planted "
              f"copies in {time.time() - t0:.0f} s", flush=True)
    return json.loads(info_path.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--mb", type=float, default=200)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--plant", type=int, default=0, help="exact copies and near copies (each) planted across files")
    args = p.parse_args()
    info = build(Path(args.out_dir), args.mb, args.files, args.plant)
    (Path(args.out_dir) / "planted.json").write_text(json.dumps(info, ensure_ascii=False))
    print(f"{info['documents']} documents, {info['bytes'] / 1e6:.1f} MB in {len(info['files'])} files, "
          f"{len(info['planted'])} planted copies")


if __name__ == "__main__":
    main()
