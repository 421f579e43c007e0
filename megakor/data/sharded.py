"""Preprocessing as a Slurm array job: N tasks tokenise their shares of the inputs on CPU nodes, one
merge stage deduplicates across all of them and writes `P.bin`/`P.idx` (slurm/preprocess.sh runs it).

Every task computes the same plan as `launch/preprocess.py` would (pieces grouped into work units) and
takes a contiguous run of units, balanced by bytes, so the units of task 0, 1, ... in order are the
single-process order. Under `P.tasks/`:

    layout.json                  fingerprint, number of tasks, the plan and each task's units
    <i>/NNNNN.bin .meta.npz .json   work units of task i (global unit numbers), as preprocess writes them:
                                 tokens, and per document its exact key and MinHash signature
    <i>/NNNNN.bands.npy          per document, a 64-bit hash of each LSH band of its signature
    <i>/task.json                written last: task i's report; its presence means task i is done

A task that is run again redoes only the units without their .json. The merge (as MinHash dedup is
split into signature, bucket and cluster stages in datatrove and NeMo Curator):
  buckets   exact keys and band hashes of all documents, a hash range at a time so memory is bounded;
            a document whose key or band hash occurs twice is a candidate, every other document is
            kept: it cannot be a duplicate of anything, nor anything a duplicate of it;
  cluster   the candidates, in input order, through the same greedy `Deduplicator` rule as the single
            process (the first of each group is kept), while the kept documents are written out.
The result equals the single-process run token for token. The merge's memory is bounded by one work
unit and one bucket pass; its Deduplicator holds only the candidates, not every kept document.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from megakor.data.dedup import lsh_bands
from megakor.data.indexed import dtype_for_vocab, is_indexed_prefix
from megakor.data.preprocess import (
    PreprocessOptions, _fingerprint, _run_shards, _tokenizer_backend, _write_report, fast_path_supported, merge_units,
    peak_rss_mb, plan_work_units,
)
from megakor.data.sources import Piece, expand_inputs, line_offsets

log = logging.getLogger(__name__)

ARRAY_COMMAND = "sbatch --array=0-N slurm/preprocess.sh --input ... --tokenizer ... --output-prefix P"
# Keys and band hashes sorted per pass of the bucket stage: about 40 bytes each with the sort's copies.
BUCKET_ENTRIES_PER_PASS = 8_000_000
_MIX = np.uint64(0x9E3779B97F4A7C15)


class ArrayJobError(ValueError):
    """A task or the merge cannot go on; the message is one sentence naming the fix."""


def task_units(unit_bytes: list[int], num_tasks: int) -> list[list[int]]:
    """Contiguous runs of work units, one per task, balanced by input bytes: unit u goes to the task
    whose share of the total its middle byte falls in (some tasks get none when units are few)."""
    total = max(sum(unit_bytes), 1)
    shares: list[list[int]] = [[] for _ in range(num_tasks)]
    before = 0
    for u, size in enumerate(unit_bytes):
        shares[min(num_tasks - 1, (2 * before + size) * num_tasks // (2 * total))].append(u)
        before += size
    return shares


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [documents, bands]: a 64-bit hash of each band of each MinHash signature, the band's index
    mixed in so equal rows in different bands do not meet. Equal bands hash equal; unequal ones collide
    with probability 2**-64, which would only make a document a candidate, never change a decision."""
    sig = np.asarray(signatures, dtype=np.uint64)
    out = np.empty((len(sig), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            h = np.full(len(sig), np.uint64(b + 1) * _MIX, dtype=np.uint64)
            for j in range(b * rows, (b + 1) * rows):
                h = (h ^ sig[:, j]) * np.uint64(0xBF58476D1CE4E5B9)
                h ^= h >> np.uint64(31)
            out[:, b] = h
    return out


# ---------------------------------------------------------------------------------------------
# Layout: the plan every task and the merge agree on


def tasks_dir(prefix: str) -> str:
    return str(prefix) + ".tasks"


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def _layout(prefix: str, fingerprint: str, files: list[str], options: PreprocessOptions, num_tasks: int | None,
            workers: int) -> dict:
    """The stored layout, or a new one (written atomically; tasks that start together write the same)."""
    path = os.path.join(tasks_dir(prefix), "layout.json")
    layout = _read_json(path)
    if layout is not None:
        if layout["fingerprint"] != fingerprint:
            raise ArrayJobError(
                f"{tasks_dir(prefix)} holds tasks of other inputs, tokenizer or options (or the input files changed "
                f"since); delete {tasks_dir(prefix)} and submit again, or choose another --output-prefix")
        if num_tasks is not None and num_tasks != layout["num_tasks"]:
            raise ArrayJobError(
                f"{tasks_dir(prefix)} was planned for {layout['num_tasks']} tasks, not {num_tasks}; resubmit missing "
                f"tasks with their own indices (sbatch --array=2,3 ...) or delete {tasks_dir(prefix)} to start over")
        return layout
    if num_tasks is None:
        raise ArrayJobError(f"no task has planned {prefix} yet; give --num-tasks, or submit with sbatch --array=0-N")
    plan = plan_work_units(files, options, num_tasks * max(workers, 1))
    pieces = [Piece.from_dict(d) for d in plan["pieces"]]
    unit_bytes = [sum(pieces[j].size for j in unit) for unit in plan["shards"]]
    layout = {"fingerprint": fingerprint, "num_tasks": num_tasks, **plan, "tasks": task_units(unit_bytes, num_tasks)}
    os.makedirs(tasks_dir(prefix), exist_ok=True)
    _write_json(path, layout)
    return layout


def array_task_from_env(prefix: str, environ=os.environ) -> tuple[int, int | None]:
    """(task index, number of tasks or None = as planned) of a Slurm array task. The first submission
    must number its tasks 0-N; a resubmission of some tasks (--array=2,3) takes the count from the layout."""
    if not environ.get("SLURM_ARRAY_TASK_ID"):
        raise ArrayJobError("--slurm-array needs a Slurm array task; submit with sbatch --array=0-N "
                            "slurm/preprocess.sh ..., or give --task-index and --num-tasks")
    index = int(environ["SLURM_ARRAY_TASK_ID"])
    if os.path.exists(os.path.join(tasks_dir(prefix), "layout.json")):
        return index, None
    first, last = int(environ.get("SLURM_ARRAY_TASK_MIN", 0)), int(environ.get("SLURM_ARRAY_TASK_MAX", index))
    if first != 0:
        raise ArrayJobError(f"this array job starts at task {first}, but the first submission for {prefix} must "
                            "number its tasks from 0 (sbatch --array=0-N) so that every share of the input has a task")
    return index, last + 1


# ---------------------------------------------------------------------------------------------
# One task


def run_task(inputs, tokenizer_path: str, output_prefix: str, task_index: int, num_tasks: int | None, workers: int = 2,
             options: PreprocessOptions | None = None, progress: bool = True) -> dict:
    """Tokenise task `task_index`'s share into `P.tasks/<task_index>/`; returns its report (task.json)."""
    options = options or PreprocessOptions()
    if options.format != "text":
        raise ArrayJobError("the array job preprocesses text sources; preprocess task data (format chat) "
                            "with launch/preprocess.py in one process")
    t0 = time.time()
    prefix = str(output_prefix)
    files, unsupported = expand_inputs(inputs)
    tokenizer_json, eos_id, vocab_size = _tokenizer_backend(tokenizer_path)
    fingerprint = _fingerprint(files, tokenizer_json, eos_id, options)
    if num_tasks is not None and not 0 <= task_index < num_tasks:
        raise ArrayJobError(f"task index {task_index} is outside 0-{num_tasks - 1}; give an index below --num-tasks")
    done = _read_json(prefix + ".json") if is_indexed_prefix(prefix) else None
    if done is not None and done.get("fingerprint") == fingerprint:
        log.info("%s is already preprocessed from these inputs; task %d has nothing to do", prefix, task_index)
        return {"task": task_index, "already_merged": True}
    layout = _layout(prefix, fingerprint, files, options, num_tasks, workers)
    num_tasks = layout["num_tasks"]
    if not 0 <= task_index < num_tasks:
        raise ArrayJobError(f"task index {task_index} is outside 0-{num_tasks - 1}, the tasks {prefix} was planned for; "
                            f"submit --array indices below {num_tasks}")
    work_dir = os.path.join(tasks_dir(prefix), str(task_index))
    os.makedirs(work_dir, exist_ok=True)
    stored = _read_json(os.path.join(work_dir, "task.json"))
    if stored is not None and stored.get("fingerprint") == fingerprint:
        log.info("task %d of %d is already done (%s)", task_index, num_tasks, os.path.join(work_dir, "task.json"))
        return stored
    pieces = [Piece.from_dict(d) for d in layout["pieces"]]
    units = layout["tasks"][task_index]
    done_units = [u for u in units if os.path.exists(os.path.join(work_dir, f"{u:05d}.json"))]
    todo = [(u, [(j, pieces[j]) for j in layout["shards"][u]], work_dir) for u in units if u not in done_units]
    task_bytes = sum(pieces[j].size for u in units for j in layout["shards"][u])
    log.info("task %d of %d: %d work units, %.1f MB of input (%d done before)", task_index, num_tasks, len(units),
             task_bytes / 1e6, len(done_units))
    fast = bool(todo) and options.fast_tokenizer and fast_path_supported(tokenizer_json)
    _run_shards(todo, tokenizer_json, eos_id, vocab_size, options, workers, progress, fast, str(tokenizer_path),
                total_bytes=task_bytes, done_bytes=sum(pieces[j].size for u in done_units for j in layout["shards"][u]),
                desc=f"task {task_index}/{num_tasks}")
    bands = lsh_bands(options.near_dup_threshold, options.num_perm) if options.clean is not None and options.near_dedup else None
    report = {"task": task_index, "num_tasks": num_tasks, "fingerprint": fingerprint, "units": units, "bytes": task_bytes,
              "records": 0, "documents": 0, "tokens": 0, "skipped": Counter(), "cleaning": Counter()}
    for u in units:
        base = os.path.join(work_dir, f"{u:05d}")
        with open(base + ".json") as f:
            summary = json.load(f)
        report["records"] += summary["records"]
        report["documents"] += summary["documents"]
        report["tokens"] += summary["tokens"]
        report["skipped"].update(reason for reason, *_ in summary["skips"])
        report["cleaning"].update(summary["cleaning"])
        if bands is not None and not os.path.exists(base + ".bands.npy"):
            np.save(base + ".bands.tmp.npy", band_hashes(np.load(base + ".meta.npz")["sig"], *bands))
            os.replace(base + ".bands.tmp.npy", base + ".bands.npy")
    seconds = time.time() - t0
    report.update(skipped=dict(sorted(report["skipped"].items())), cleaning=dict(sorted(report["cleaning"].items())),
                  unsupported_files=unsupported,
                  tokenizer_engine="tiktoken" if fast else "tokenizers" if todo else "none (every unit done before)",
                  started=t0, finished=time.time(), seconds=round(seconds, 3),
                  tokens_per_sec=round(report["tokens"] / max(seconds, 1e-9), 1), peak_rss_mb=peak_rss_mb())
    _write_json(os.path.join(work_dir, "task.json"), report)
    log.info("task %d of %d done: %d documents, %d tokens, skipped %s, %.0f s", task_index, num_tasks,
             report["documents"], report["tokens"], report["skipped"] or "none", seconds)
    return report


# ---------------------------------------------------------------------------------------------
# Merge: buckets, then cluster + write


def find_candidates(unit_bases: list[str], unit_documents: list[int], exact: bool, bands: int,
                    entries_per_pass: int = BUCKET_ENTRIES_PER_PASS) -> tuple[np.ndarray, int]:
    """(one bool per document of all units: it shares an exact key or a band hash with another document,
    number of passes). `bands` = 0: no near dedup. Each pass sorts the keys and band hashes that fall in
    one range of hash values (value mod passes), so memory is bounded by `entries_per_pass`."""
    first = np.concatenate([[0], np.cumsum(unit_documents, dtype=np.int64)])
    candidates = np.zeros(int(first[-1]), dtype=bool)
    columns = int(exact) + bands
    passes = max(1, math.ceil(len(candidates) * columns / entries_per_pass))
    for p in range(passes if columns else 0):
        values, docs = [], []
        for u, base in enumerate(unit_bases):
            if not unit_documents[u]:
                continue
            arrays = []
            if exact:
                arrays.append(np.load(base + ".meta.npz")["key"].reshape(-1, 1))
            if bands:
                arrays.append(np.load(base + ".bands.npy", mmap_mode="r"))
            table = np.concatenate(arrays, axis=1)
            if passes > 1:
                mask = table % np.uint64(passes) == np.uint64(p)
                rows = np.nonzero(mask)[0]
                values.append(table[mask])
            else:
                rows = np.repeat(np.arange(len(table)), columns)
                values.append(table.ravel())
            docs.append(first[u] + rows)
        if not values:
            continue
        v, d = np.concatenate(values), np.concatenate(docs)
        order = np.argsort(v, kind="stable")
        v, d = v[order], d[order]
        same = v[1:] == v[:-1]
        candidates[d[1:][same]] = True
        candidates[d[:-1][same]] = True
    return candidates, passes


def merge(inputs, tokenizer_path: str, output_prefix: str, options: PreprocessOptions | None = None,
          report_path: str | None = None, keep_shards: bool = False,
          entries_per_pass: int = BUCKET_ENTRIES_PER_PASS) -> dict:
    """Deduplicate the finished tasks globally and write `P.bin`/`P.idx`, `P.json` and the report
    (`report_path`, `P.report.json` by default); returns it. A finished prefix is returned as stored."""
    options = options or PreprocessOptions()
    t0 = time.time()
    prefix = str(output_prefix)
    report_path = report_path or prefix + ".report.json"
    files, unsupported = expand_inputs(inputs)
    tokenizer_json, eos_id, vocab_size = _tokenizer_backend(tokenizer_path)
    fingerprint = _fingerprint(files, tokenizer_json, eos_id, options)
    done = _read_json(prefix + ".json") if is_indexed_prefix(prefix) else None
    if done is not None and done.get("fingerprint") == fingerprint:
        log.info("%s is already merged from these inputs; reusing it", prefix)
        _write_report(done, report_path)
        return done
    layout = _read_json(os.path.join(tasks_dir(prefix), "layout.json"))
    if layout is None:
        raise ArrayJobError(f"no task has run for {prefix} ({tasks_dir(prefix)}/layout.json is missing); "
                            f"run the tasks first: {ARRAY_COMMAND}")
    if layout["fingerprint"] != fingerprint:
        raise ArrayJobError(f"the tasks in {tasks_dir(prefix)} were run on other inputs, tokenizer or options (or the "
                            "files changed since); give the merge the tasks' options, or delete it and submit again")
    num_tasks = layout["num_tasks"]
    task_reports = [_read_json(os.path.join(tasks_dir(prefix), str(i), "task.json")) for i in range(num_tasks)]
    missing = [i for i, r in enumerate(task_reports) if r is None or r.get("fingerprint") != fingerprint]
    if missing:
        which = ",".join(map(str, missing))
        raise ArrayJobError(f"task(s) {which} of {num_tasks} have not finished (no {tasks_dir(prefix)}/<i>/task.json); "
                            f"resubmit them with sbatch --array={which} slurm/preprocess.sh and the same options, "
                            "which merges again when they are done")
    pieces = [Piece.from_dict(d) for d in layout["pieces"]]
    owner = {u: i for i, units in enumerate(layout["tasks"]) for u in units}
    unit_bases = [os.path.join(tasks_dir(prefix), str(owner[u]), f"{u:05d}") for u in range(len(layout["shards"]))]
    unit_documents = []
    for base in unit_bases:
        with open(base + ".json") as f:
            unit_documents.append(json.load(f)["documents"])

    t_buckets = time.time()
    dedup = options.clean is not None and (options.exact_dedup or options.near_dedup)
    bands = lsh_bands(options.near_dup_threshold, options.num_perm)[0] if dedup and options.near_dedup else 0
    candidates, passes = (find_candidates(unit_bases, unit_documents, options.exact_dedup, bands, entries_per_pass)
                          if dedup else (None, 0))
    t_write = time.time()
    log.info("merge: %d documents from %d tasks; %d share an exact key or an LSH band with another (%d bucket "
             "pass(es), %.1f s)", sum(unit_documents), num_tasks, 0 if candidates is None else int(candidates.sum()),
             passes, t_write - t_buckets)
    merged, unit_stats = merge_units(prefix, unit_bases, pieces, options, vocab_size, eos_id, candidates)
    t_end = time.time()

    tasks = []
    for i, r in enumerate(task_reports):
        stats = [unit_stats[u] for u in layout["tasks"][i]]
        duplicates = Counter()
        for s in stats:
            duplicates.update({k: v for k, v in s.items() if k in ("exact_duplicate", "near_duplicate")})
        tasks.append({
            "task": i, "units": len(r["units"]), "bytes": r["bytes"], "records": r["records"],
            "documents_tokenised": r["documents"], "tokens_tokenised": r["tokens"],
            "documents": r["documents"] - sum(duplicates.values()),
            "skipped": dict(sorted((Counter(r["skipped"]) + duplicates).items())),
            "seconds": r["seconds"], "tokens_per_sec": r["tokens_per_sec"], "peak_rss_mb": r["peak_rss_mb"],
            "tokenizer_engine": r["tokenizer_engine"],
        })
    started = min(r["started"] for r in task_reports)
    finished = max(r["finished"] for r in task_reports)
    merged.update(
        fingerprint=fingerprint, tokenizer=str(tokenizer_path), eos_id=eos_id, vocab_size=vocab_size,
        dtype=str(dtype_for_vocab(vocab_size)), inputs=len(files), unsupported_files=unsupported,
        bytes={"input": sum(p.size for p in pieces), "output": os.path.getsize(prefix + ".bin") + os.path.getsize(prefix + ".idx")},
        shards={"total": len(layout["shards"]), "tasks": num_tasks},
        tasks=tasks,
        stages={
            "tokenise": {"wall_seconds": round(finished - started, 3), "task_seconds": [t["seconds"] for t in tasks]},
            "buckets": {"seconds": round(t_write - t_buckets, 3), "passes": passes,
                        "candidates": 0 if candidates is None else int(candidates.sum())},
            "merge": {"seconds": round(t_end - t_write, 3)},
        },
        seconds=round(finished - started + t_end - t0, 3),
        peak_rss_mb={"merge": peak_rss_mb()["main"], "task_worker_max": max(t["peak_rss_mb"]["worker"] for t in tasks),
                     "task_main_max": max(t["peak_rss_mb"]["main"] for t in tasks)},
    )
    merged["tokens_per_sec"] = round(merged["tokens"] / max(merged["seconds"], 1e-9), 1)
    _write_json(prefix + ".json", merged)
    _write_report(merged, report_path)
    if not keep_shards:
        shutil.rmtree(tasks_dir(prefix))
    log.info("merged %s: %d documents, %d tokens, skipped %s; report in %s", prefix, merged["documents"],
             merged["tokens"], merged["skipped"] or "none", report_path)
    return merged


def task_of_line(prefix: str):
    """A function (path, line) -> the array task that read that line, from a kept P.tasks/ (its layout
    and the work units' line counts): which task a document came from, for reports and checks."""
    layout = json.loads(Path(prefix + ".tasks/layout.json").read_text())
    pieces = [Piece.from_dict(d) for d in layout["pieces"]]
    lines, owner = {}, {}
    for t, units in enumerate(layout["tasks"]):
        for u in units:
            summary = json.loads(Path(f"{prefix}.tasks/{t}/{u:05d}.json").read_text())
            lines.update({int(k): v for k, v in summary["piece_lines"].items()})
            owner.update({j: t for j in layout["shards"][u]})
    offsets = line_offsets(pieces, lines)
    by_path: dict[str, list[tuple[int, int, int]]] = {}
    for j, p in enumerate(pieces):
        by_path.setdefault(p.path, []).append((offsets[j], offsets[j] + lines.get(j, 1 << 40), owner[j]))
    return lambda path, line: next(t for a, b, t in by_path[path] if a < line <= b)
