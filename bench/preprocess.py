"""Benchmark: tokens/s of launch/preprocess.py against the pipeline a user would write with `datasets`,
and random-access read rate of the resulting memory-mapped dataset.

    python bench/preprocess.py --tokenizer ../shared/fixtures/tokenizers/llama3 --mb 50 --workers 2

Corpus: real Korean text from the konlpy wheel (kolaw: the constitution; kobill: ten bills), fetched
with `pip download --no-deps konlpy` unless --konlpy-wheel is given, cut into lines and reassembled
into documents of 20-60 shuffled lines each (with a document number) until the JSONL reaches --mb MB.

Baseline (what the issue names): datasets.load_dataset("json") -> .map(tokenize, batched=True,
num_proc=N) -> ids + EOS written to a flat binary file. Both sides run as fresh processes, timed
end to end (imports and tokenizer loading included), with `--no-clean` on our side so that both do
the same work; their token totals must agree exactly. Our run with cleaning and dedup on is shown too.

Scale mode: tokens/s of launch/preprocess.py (cleaning and dedup on) against workers and input size,
and the peak resident memory of the largest worker and of the main process (which merges and holds the
near-duplicate index), median of --scale-repeats runs per size (one number per size). The corpus is
Korean-like text built from the offline corpora (bench/korean_corpus.py). Writes
bench/results/preprocess_scale.json.

    python bench/preprocess.py --scale --scale-gb 0.2 2 --scale-workers 1 2 --scale-repeats 3 1
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = textwrap.dedent(
    """
    import sys, numpy as np, datasets
    from megakor.tokenizer import load_tokenizer
    corpus, tok_path, out, cache, workers = sys.argv[1:6]
    tok = load_tokenizer(tok_path)
    eos = tok.eos_token_id
    ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in tok(batch["text"]).input_ids]}
    ds = ds.map(tokenize, batched=True, num_proc=int(workers), remove_columns=ds.column_names)
    dtype = np.uint16 if len(tok) <= 65536 else np.uint32
    total = 0
    with open(out, "wb") as f:
        for batch in ds.iter(batch_size=1000):
            ids = np.concatenate([np.asarray(x, dtype=dtype) for x in batch["input_ids"]])
            f.write(ids.tobytes())
            total += len(ids)
    print("TOKENS", total)
    """
)


def korean_lines(wheel: str | None, work: Path) -> list[str]:
    if wheel is None:
        found = glob.glob(str(work / "konlpy-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "konlpy", "-d", str(work), "-q"], check=True)
            found = glob.glob(str(work / "konlpy-*.whl"))
        if not found:
            raise SystemExit("could not fetch the konlpy wheel; pass --konlpy-wheel PATH to a downloaded konlpy-*.whl")
        wheel = found[0]
    lines = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if "/corpus/kolaw/" in name or "/corpus/kobill/" in name:
                if name.endswith(".txt"):
                    lines += [ln.strip() for ln in z.read(name).decode("utf-8").splitlines() if len(ln.strip()) > 5]
    return lines


def build_corpus(path: Path, lines: list[str], megabytes: int) -> int:
    rng = random.Random(0)
    target, size, docs = megabytes << 20, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            body = " ".join(rng.sample(lines, rng.randint(20, 60)))
            line = json.dumps({"text": f"문서 {docs}. {body}"}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            docs += 1
    return docs


def timed(cmd: list[str], env=None) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and all its reaped descendants, stdout). CPU time is
    the figure to trust on a shared machine, where wall time depends on what else is running."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, proc.stdout


def read_rates(prefix: str, seq_len: int, n: int = 20000) -> tuple[float, float]:
    import numpy as np

    sys.path.insert(0, str(REPO))
    from megakor.data.blend import PackedSource
    from megakor.data.indexed import IndexedDataset

    docs = IndexedDataset(prefix)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(docs), n)
    t0 = time.perf_counter()
    for i in idx:
        np.asarray(docs[int(i)]).sum()  # touch the tokens, not just the view
    doc_rate = n / (time.perf_counter() - t0)
    packed = PackedSource(prefix, seq_len, seed=0, shuffle=True)
    packed[0]  # builds the epoch order once, as training does at start-up
    idx = rng.integers(0, len(packed), n)
    t0 = time.perf_counter()
    for i in idx:
        packed[int(i)]
    return doc_rate, n / (time.perf_counter() - t0)


def scale(args) -> None:
    import statistics

    sys.path.insert(0, str(REPO / "bench"))
    from korean_corpus import cached_corpus

    work = Path(args.work_dir)
    repeats = args.scale_repeats + [args.scale_repeats[-1]] * (len(args.scale_gb) - len(args.scale_repeats))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs, rows = [], []
    for gb, n in zip(args.scale_gb, repeats):
        info = cached_corpus(work, gb)
        for workers in args.scale_workers:
            for r in range(n):
                out = work / "scale-out"
                shutil.rmtree(out, ignore_errors=True)
                seconds, cpu, _ = timed([sys.executable, "launch/preprocess.py", "--input", *info["files"], "--tokenizer",
                                         args.tokenizer, "--output-prefix", str(out / "p"), "--workers", str(workers),
                                         "--quiet", "--report", str(out / "report.json")], env)
                report = json.loads((out / "report.json").read_text())
                run = {"gb": gb, "bytes": info["bytes"], "workers": workers, "repeat": r, "wall_seconds": round(seconds, 2),
                       "cpu_seconds": round(cpu, 2), "tokens": report["tokens"], "tokens_per_sec": round(report["tokens"] / seconds),
                       "peak_rss_mb": report["peak_rss_mb"], "load_average": os.getloadavg()[0]}
                runs.append(run)
                print(json.dumps(run), flush=True)
            mine = [x for x in runs if x["gb"] == gb and x["workers"] == workers]
            rows.append({"gb": gb, "workers": workers, "runs": len(mine),
                         "tokens_per_sec_median": statistics.median(x["tokens_per_sec"] for x in mine),
                         "worker_peak_rss_mb_max": max(x["peak_rss_mb"]["worker"] for x in mine),
                         "main_peak_rss_mb_max": max(x["peak_rss_mb"]["main"] for x in mine)})
        shutil.rmtree(work / "scale-out", ignore_errors=True)
    print(f"\n{'GB':>6} {'workers':>7} {'runs':>4} {'tokens/s (median)':>18} {'worker peak RSS MB':>19} {'main peak RSS MB':>17}")
    for row in rows:
        print(f"{row['gb']:>6} {row['workers']:>7} {row['runs']:>4} {row['tokens_per_sec_median']:>18,.0f} "
              f"{row['worker_peak_rss_mb_max']:>19,.0f} {row['main_peak_rss_mb_max']:>17,.0f}")
    result = {"tokenizer": args.tokenizer, "cpus": os.cpu_count(), "summary": rows, "runs": runs}
    Path(args.scale_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.scale_out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {args.scale_out}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared/fixtures/tokenizers/llama3"))
    p.add_argument("--mb", type=int, default=50, help="corpus size in MB of JSONL")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "megakor-bench-preprocess"))
    p.add_argument("--konlpy-wheel", help="a konlpy-*.whl already downloaded")
    p.add_argument("--repeats", type=int, default=1, help="time each pipeline this many times, alternating, and keep the fastest")
    p.add_argument("--skip-clean", action="store_true", help="do not time the run with cleaning and dedup")
    p.add_argument("--scale", action="store_true", help="scale mode: tokens/s and peak memory against workers and size")
    p.add_argument("--scale-gb", type=float, nargs="+", default=[0.2, 2.0], help="input sizes (GB of JSONL)")
    p.add_argument("--scale-workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--scale-repeats", type=int, nargs="+", default=[3, 1], help="runs per size (median reported)")
    p.add_argument("--scale-out", default=str(REPO / "bench/results/preprocess_scale.json"))
    args = p.parse_args()
    if args.scale:
        return scale(args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"korean-{args.mb}mb.jsonl"
    if not corpus.exists():
        lines = korean_lines(args.konlpy_wheel, work)
        docs = build_corpus(corpus, lines, args.mb)
        print(f"built {corpus}: {docs} documents from {len(lines)} distinct lines")
    size_mb = corpus.stat().st_size / (1 << 20)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    rows = []
    ours_cmd = [sys.executable, "launch/preprocess.py", "--input", str(corpus), "--tokenizer", args.tokenizer,
                "--workers", str(args.workers), "--quiet"]
    script = work / "baseline.py"
    script.write_text(BASELINE)

    def fresh(out):
        for suffix in (".bin", ".idx", ".json"):
            Path(str(work / out) + suffix).unlink(missing_ok=True)
        shutil.rmtree(str(work / out) + ".shards", ignore_errors=True)
        shutil.rmtree(work / "hf_cache", ignore_errors=True)

    best = {}
    for _ in range(args.repeats):  # alternate, so a burst of load elsewhere hits both sides alike
        fresh("ours")
        seconds, cpu, stdout = timed(ours_cmd + ["--output-prefix", str(work / "ours"), "--no-clean"], env)
        tokens = json.loads(stdout.strip().splitlines()[-1])["tokens"]
        best["ours"] = min(best.get("ours", (1e18,)), (seconds, cpu, tokens))
        fresh("baseline")
        seconds, cpu, stdout = timed([sys.executable, str(script), str(corpus), args.tokenizer, str(work / "baseline.bin"),
                                      str(work / "hf_cache"), str(args.workers)], env)
        tokens = int(stdout.split("TOKENS")[-1])
        best["base"] = min(best.get("base", (1e18,)), (seconds, cpu, tokens))
    rows.append(("megakor launch/preprocess.py --no-clean", *best["ours"]))
    rows.append(("datasets load_dataset+map(num_proc)+write", *best["base"]))
    if rows[0][3] != rows[1][3]:
        raise SystemExit(f"token totals differ: ours {rows[0][3]} vs baseline {rows[1][3]}")

    if not args.skip_clean:
        fresh("ours_clean")
        seconds, cpu, stdout = timed(ours_cmd + ["--output-prefix", str(work / "ours_clean")], env)
        clean = json.loads(stdout.strip().splitlines()[-1])
        rows.append(("megakor launch/preprocess.py (clean+dedup)", seconds, cpu, clean["tokens"]))

    doc_rate, seq_rate = read_rates(str(work / "ours"), args.seq_len)
    print(f"\ncorpus {size_mb:.1f} MB Korean JSONL, tokenizer {args.tokenizer}, {args.workers} workers, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'pipeline':<45} {'wall s':>7} {'CPU s':>7} {'tokens':>11} {'tokens/s':>10} {'tokens/CPU-s':>13}")
    for name, s, c, t in rows:
        print(f"{name:<45} {s:>7.1f} {c:>7.1f} {t:>11,} {t / s:>10,.0f} {t / c:>13,.0f}")
    print(f"\nmmap random read: {doc_rate:,.0f} documents/s, {seq_rate:,.0f} packed sequences/s (seq_len {args.seq_len})")
    cpu_ratio = rows[1][2] / rows[0][2]
    print(f"CPU-time ratio (baseline CPU s / ours): {cpu_ratio:.2f}x")
    ratio = rows[1][1] / rows[0][1]
    print(f"speed-up of launch/preprocess.py over the datasets baseline (tokens/s, wall): {ratio:.2f}x")


if __name__ == "__main__":
    main()
