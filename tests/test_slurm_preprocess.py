"""slurm/preprocess.sh on a real (one-node) Slurm cluster: a 3-task array job over files with planted
cross-file duplicates; its first task submits the merge exactly once, and the merged PREFIX equals the
single-process launch/preprocess.py run on the same input byte for byte. Skip rules as in
test_slurm_cluster.py (skips without a cluster, fails under CI=true)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_data_sharded import build_corpus, skipped_log, tokenizer_dir
from test_slurm_cluster import _job_info, _usable_cluster  # noqa: F401 (autouse: skip or fail without Slurm)

REPO = Path(__file__).resolve().parents[1]


def _wait_gone(job_id: str, timeout: float, logs: str) -> dict:
    deadline = time.monotonic() + timeout
    while (info := _job_info(job_id)).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                             "OUT_OF_MEMORY", "NODE_FAIL", None):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], timeout=15)
            pytest.fail(f"job {job_id} did not finish in {timeout} s: {info}\n{logs}")
        time.sleep(0.5)
    return info


def test_array_job_merges_to_the_single_process_result(tmp_path):
    from megakor.data.preprocess import preprocess

    tok = str(tokenizer_dir())
    files, planted = build_corpus(tmp_path)
    single = preprocess(files, tok, str(tmp_path / "single"), workers=0, progress=False)
    prefix = str(tmp_path / "out" / "ko")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, MEGAKOR_PROGRESS_SECONDS="1", MEGAKOR_MERGE_TIME="5")
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--array=0-2", "--cpus-per-task=1", "--time=5",
         f"--output={tmp_path}/task-%A_%a.out", "slurm/preprocess.sh", "--input", *files, "--tokenizer", tok,
         "--output-prefix", prefix, "--shard-bytes", "6000"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    logs = lambda: "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("*.out")))  # noqa: E731
    assert proc.returncode == 0, f"{proc.stderr}\n{logs()}"
    array_id = proc.stdout.strip().split(";")[0]
    text = logs()
    submitted = re.findall(r"submitted merge job (\d+); it runs when every task of array job (\d+)", text)
    assert len(submitted) == 1 and submitted[0][1] == array_id, text  # by the first task, once
    info = _wait_gone(submitted[0][0], 120, text)
    text = logs()
    assert info.get("JobState") in ("COMPLETED", None), f"{info}\n{text}"
    assert "merge exited with 0" in text, text
    for task in range(3):  # per-task progress lines in each task's log
        assert re.search(rf"task {task}/3: +\d+\.\d% of [\d.]+ MB read, [\d,]+ docs", text), text

    assert Path(prefix + ".bin").read_bytes() == Path(str(tmp_path / "single") + ".bin").read_bytes()
    assert Path(prefix + ".idx").read_bytes() == Path(str(tmp_path / "single") + ".idx").read_bytes()
    assert sorted(skipped_log(prefix)) == sorted(skipped_log(str(tmp_path / "single")))
    report = json.loads(Path(prefix + ".report.json").read_text())
    assert report["documents"] == single["documents"] and report["tokens"] == single["tokens"]
    assert report["dedup"]["exact_duplicate"] + report["dedup"]["near_duplicate"] == len(planted)
    assert [t["task"] for t in report["tasks"]] == [0, 1, 2]
    assert set(report["stages"]) == {"tokenise", "buckets", "merge"}
    assert not os.path.exists(prefix + ".tasks")
