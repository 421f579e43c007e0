"""Demonstration: the 4-task Slurm array job (slurm/preprocess.sh) against the single-process
launch/preprocess.py on the same Korean-like corpus with planted cross-task duplicates.

    bash .ci/slurm_up.sh   # the one-node cluster
    python bench/preprocess_array.py --gb 2 --tasks 4 --plant 1000 --tokenizer ../shared/fixtures/tokenizers/llama3

Builds GB of JSONL in 8 files (bench/korean_corpus.py: sentences of the offline corpora, sampled and
mutated) with `--plant` exact and `--plant` near copies of first-half documents planted in the second
half; runs the single-process preprocess (--workers 2), then `sbatch --array=0-(tasks-1)` and waits for
the merge job the first task submits; checks P.bin/P.idx are byte-identical, the skipped records equal,
and every planted copy dropped as a duplicate (counting those whose original another task read). Writes
bench/results/preprocess_array.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from korean_corpus import cached_corpus  # noqa: E402


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def job_state(job_id: str) -> str | None:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else None


def missed(planted: list, dropped: dict) -> list[dict]:
    """The planted copies not dropped as duplicates, with their MinHash Jaccard estimate to the original
    and the probability that LSH banding of the dedup threshold finds a pair of that similarity."""
    from megakor.data.dedup import MinHasher, lsh_bands

    import numpy as np

    rows_of: dict[str, dict[int, str]] = {}
    for pl in planted:
        if dropped.get(f"{pl[0]}:{pl[1]}") not in ("exact_duplicate", "near_duplicate"):
            rows_of.setdefault(pl[0], {})[pl[1]] = ""
            rows_of.setdefault(pl[3], {})[pl[4]] = ""
    for path, wanted in rows_of.items():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if n in wanted:
                    wanted[n] = json.loads(line)["text"]
    hasher, (bands, rows) = MinHasher(64), lsh_bands(0.8, 64)
    out = []
    for pl in planted:
        if dropped.get(f"{pl[0]}:{pl[1]}") in ("exact_duplicate", "near_duplicate"):
            continue
        s = float(np.mean(hasher.signature(rows_of[pl[0]][pl[1]]) == hasher.signature(rows_of[pl[3]][pl[4]])))
        out.append({"copy": f"{pl[0]}:{pl[1]}", "original": f"{pl[3]}:{pl[4]}", "planted_as": pl[2],
                    "minhash_jaccard": round(s, 3), "lsh_detection_probability": round(1 - (1 - s ** rows) ** bands, 3)})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=2.0, help="corpus size in GB (10^9 bytes) of JSONL")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--plant", type=int, default=1000, help="exact copies and near copies (each) to plant")
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared/fixtures/tokenizers/llama3"))
    p.add_argument("--workers", type=int, default=2, help="tokenising processes of the single-process run")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "megakor-bench-array"))
    p.add_argument("--delete", action="store_true", help="delete the corpus and outputs afterwards")
    p.add_argument("--out", default=str(REPO / "bench/results/preprocess_array.json"))
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    info = cached_corpus(work, args.gb, args.plant)
    files = info["files"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), PYTHON=sys.executable, MEGAKOR_PROGRESS_SECONDS="60")

    single = str(work / "single")
    for suffix in (".bin", ".idx", ".json", ".skipped.log"):
        Path(single + suffix).unlink(missing_ok=True)
    t0 = time.time()
    subprocess.run([sys.executable, "launch/preprocess.py", "--input", *files, "--tokenizer", args.tokenizer,
                    "--output-prefix", single, "--workers", str(args.workers), "--quiet"], cwd=REPO, env=env, check=True)
    single_wall = time.time() - t0
    single_report = json.loads(Path(single + ".json").read_text())
    print(f"single process: {single_report['tokens']:,} tokens in {single_wall:.0f} s", flush=True)

    prefix = str(work / "array")
    for suffix in (".bin", ".idx", ".json", ".report.json", ".skipped.log"):
        Path(prefix + suffix).unlink(missing_ok=True)
    shutil.rmtree(prefix + ".tasks", ignore_errors=True)
    logs = work / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    t0 = time.time()
    out = subprocess.run(["sbatch", "--parsable", f"--array=0-{args.tasks - 1}", f"--cpus-per-task={args.cpus_per_task}",
                          "--time=600", f"--output={logs}/task-%A_%a.out", "slurm/preprocess.sh", "--input", *files,
                          "--tokenizer", args.tokenizer, "--output-prefix", prefix, "--keep-shards"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    array_id = out.strip().split(";")[0]
    merge_id = None
    while True:
        text = "".join(f.read_text() for f in logs.glob("*.out"))
        if merge_id is None and (m := re.search(r"submitted merge job (\d+)", text)):
            merge_id = m.group(1)
        states = [job_state(array_id)] + ([job_state(merge_id)] if merge_id else [])
        if merge_id and job_state(merge_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", None):
            break
        if merge_id is None and states[0] in ("FAILED", "CANCELLED", "TIMEOUT", None) and "exited with" in text:
            raise SystemExit(f"array job {array_id} failed before submitting the merge:\n{text[-3000:]}")
        time.sleep(5)
    array_wall = time.time() - t0
    if not Path(prefix + ".report.json").exists():
        raise SystemExit(f"merge job {merge_id} wrote no report:\n{text[-3000:]}")
    report = json.loads(Path(prefix + ".report.json").read_text())

    identical = {s: sha256(single + s) == sha256(prefix + s) for s in (".bin", ".idx")}
    skipped_equal = sorted(Path(single + ".skipped.log").read_text().splitlines()) == sorted(
        Path(prefix + ".skipped.log").read_text().splitlines())
    dropped = {}
    for line in Path(prefix + ".skipped.log").read_text().splitlines()[1:]:
        reason, where = line.split("\t")[:2]
        dropped[where] = reason
    from megakor.data.sharded import task_of_line

    task_of = task_of_line(prefix)
    planted = info["planted"]
    caught = [pl for pl in planted if dropped.get(f"{pl[0]}:{pl[1]}") in ("exact_duplicate", "near_duplicate")]
    same_reason = [pl for pl in planted if dropped.get(f"{pl[0]}:{pl[1]}") == pl[2]]
    cross = [pl for pl in planted if task_of(pl[0], pl[1]) != task_of(pl[3], pl[4])]
    cross_caught = [pl for pl in cross if pl in caught]
    result = {
        "corpus": {"bytes": info["bytes"], "files": len(files), "documents": info["documents"],
                   "planted": {"exact": sum(pl[2] == "exact_duplicate" for pl in planted),
                               "near": sum(pl[2] == "near_duplicate" for pl in planted)}},
        "tokenizer": args.tokenizer, "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
        "single_process": {"workers": args.workers, "wall_seconds": round(single_wall, 1), "documents": single_report["documents"],
                           "tokens": single_report["tokens"], "tokens_per_sec": round(single_report["tokens"] / single_wall),
                           "peak_rss_mb": single_report["peak_rss_mb"], "skipped": single_report["skipped"]},
        "array_job": {"tasks": args.tasks, "cpus_per_task": args.cpus_per_task, "array_job_id": array_id, "merge_job_id": merge_id,
                      "wall_seconds_submit_to_merged": round(array_wall, 1), "documents": report["documents"],
                      "tokens": report["tokens"], "stages": report["stages"], "peak_rss_mb": report["peak_rss_mb"],
                      "per_task": report["tasks"], "skipped": report["skipped"]},
        "equal_to_single_process": {"bin_sha256_equal": identical[".bin"], "idx_sha256_equal": identical[".idx"],
                                    "skipped_records_equal": skipped_equal},
        "planted_caught": {"total": len(planted), "caught": len(caught), "caught_with_planted_reason": len(same_reason),
                           "cross_task": len(cross), "cross_task_caught": len(cross_caught),
                           "missed": missed(planted, dropped)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("equal_to_single_process", "planted_caught")}))
    print(f"single {single_wall:.0f} s; array job (submit to merged) {array_wall:.0f} s; written {args.out}")
    if args.delete:
        shutil.rmtree(work)
    ok = all(identical.values()) and skipped_equal and len(caught) == len(planted)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
