"""The array job's tasks + merge (megakor.data.sharded) against the single-process launch/preprocess.py on
the same input: the same tokens in the same order, the same skipped records at the same file:line, and
every planted exact and near duplicate whose original lies in another task's share caught; resume of one
task, and an unfinished task refused by the merge before it writes anything."""

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from megakor.data.indexed import IndexedDataset
from megakor.data.preprocess import PreprocessOptions, preprocess
from megakor.data.sharded import ArrayJobError, band_hashes, find_candidates, merge, run_task, task_units

FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures"


def tokenizer_dir(name="llama3"):
    path = FIXTURES / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"tokenizer fixture {path} is absent (it ships in shared/fixtures)")
    return path


def random_korean(n_words, rng):
    """Words of random Hangul syllables: documents that share no more than chance shingles."""
    return " ".join("".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(1, 4))) for _ in range(n_words)) + "."


def near_copy(text, rng):
    words = text.split()
    i = rng.randrange(len(words))
    return " ".join(words[:i] + ["서울특별시"] + words[i + 1:])  # one word of ~80 changed: Jaccard ~0.9


def build_corpus(root: Path, seed: int = 0):
    """Four files (JSONL, gzipped JSONL, plain text); the later files carry exact copies (re-spaced,
    upper-cased) and one-word edits of documents of the first file, plus bad records. Returns the
    files and the planted duplicates as {(path, line): (reason, line of the original in part0.jsonl)}."""
    rng = random.Random(seed)
    originals = [random_korean(80, rng) for _ in range(40)]
    planted = {}
    files = []
    for f in range(3):
        name = root / (f"part{f}.jsonl.gz" if f == 1 else f"part{f}.jsonl")
        lines = []
        for i in range(40):
            if f and i % 7 == 3:
                k = rng.randrange(20)
                lines.append(json.dumps({"text": "  ".join(originals[k].split())}, ensure_ascii=False))
                planted[(str(name), len(lines))] = ("exact_duplicate", k + 1)
            elif f and i % 7 == 5:
                k = rng.randrange(20)
                lines.append(json.dumps({"text": near_copy(originals[k], rng)}, ensure_ascii=False))
                planted[(str(name), len(lines))] = ("near_duplicate", k + 1)
            elif f == 0:
                lines.append(json.dumps({"text": originals[i]}, ensure_ascii=False))
            elif i == 11:
                lines.append('{"text": "broken')  # malformed JSON
            elif i == 13:
                lines.append(json.dumps({"text": "짧다"}, ensure_ascii=False))  # too short
            else:
                lines.append(json.dumps({"text": random_korean(60, rng)}, ensure_ascii=False))
        data = ("\n".join(lines) + "\n").encode()
        name.write_bytes(gzip.compress(data) if name.suffix == ".gz" else data)
        files.append(str(name))
    text = root / "part3.txt"
    blocks = [random_korean(50, rng) for _ in range(15)] + [originals[30]]
    text.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    planted[(str(text), 2 * len(blocks) - 1)] = ("exact_duplicate", 31)
    files.append(str(text))
    return files, planted


def run_array(files, tok, prefix, num_tasks, options, **merge_kw):
    for i in reversed(range(num_tasks)):  # order of tasks must not matter
        run_task(files, str(tok), prefix, i, num_tasks, workers=0, options=options, progress=False)
    return merge(files, str(tok), prefix, options=options, **merge_kw)


def skipped_log(prefix):
    return Path(prefix + ".skipped.log").read_text().splitlines()


def test_tasks_and_merge_equal_the_single_process_run_and_catch_cross_task_duplicates(tmp_path):
    tok = tokenizer_dir()
    files, planted = build_corpus(tmp_path)
    single = preprocess(files, str(tok), str(tmp_path / "single"), workers=0, progress=False)
    options = PreprocessOptions(shard_bytes=6000)  # many small work units, cut elsewhere than the single run's
    prefix = str(tmp_path / "array")
    report = run_array(files, tok, prefix, 4, options, keep_shards=True, entries_per_pass=500)  # several bucket passes

    assert Path(prefix + ".bin").read_bytes() == Path(str(tmp_path / "single") + ".bin").read_bytes()
    assert Path(prefix + ".idx").read_bytes() == Path(str(tmp_path / "single") + ".idx").read_bytes()
    assert sorted(skipped_log(prefix)) == sorted(skipped_log(str(tmp_path / "single")))  # grouped by work unit
    for key in ("records", "documents", "tokens", "characters", "skipped", "cleaning", "dedup", "fingerprint"):
        assert report[key] == single[key], key
    assert report["stages"]["buckets"]["passes"] > 1
    assert report["skipped"]["malformed_json"] == 2 and report["skipped"]["too_short"] == 2

    # Every planted duplicate is dropped for its reason; most have their original in another task's share.
    from megakor.data.sharded import task_of_line

    task_of = task_of_line(prefix)
    cross = [key for key, (_, original) in planted.items() if task_of(*key) != task_of(files[0], original)]
    assert len(cross) >= len(planted) // 2, (len(cross), len(planted))
    dropped = {tuple(line.split("\t")[:2]) for line in skipped_log(prefix)[1:]}
    for (path, line), (reason, _) in planted.items():
        assert (reason, f"{path}:{line}") in dropped, (path, line, reason)
    assert report["dedup"] == {"exact_duplicate": sum(r == "exact_duplicate" for r, _ in planted.values()),
                               "near_duplicate": sum(r == "near_duplicate" for r, _ in planted.values())}
    per_task = sum(t["skipped"].get("exact_duplicate", 0) + t["skipped"].get("near_duplicate", 0) for t in report["tasks"])
    assert per_task == len(planted)
    assert sum(t["documents"] for t in report["tasks"]) == report["documents"]
    assert IndexedDataset(prefix).num_tokens == report["tokens"]
    from megakor.data.blend import SourceSpec, resolve_source

    assert resolve_source(SourceSpec(path=prefix), None, None, 0) == prefix  # data.sources names the one prefix
    assert json.loads(Path(prefix + ".report.json").read_text())["tokens"] == report["tokens"]


def test_task_resumes_its_unfinished_units_and_merge_refuses_unfinished_tasks(tmp_path):
    tok = tokenizer_dir()
    files, _ = build_corpus(tmp_path, seed=1)
    options = PreprocessOptions(shard_bytes=6000)
    prefix = str(tmp_path / "p")
    for i in range(3):
        run_task(files, str(tok), prefix, i, 3, workers=0, options=options, progress=False)
    task1 = Path(prefix + ".tasks/1")
    units = sorted(task1.glob("[0-9]*.json"))
    assert len(units) >= 2
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in task1.glob("*.bin")}
    os.remove(task1 / "task.json")  # task 1 "crashed" before its last unit finished
    os.remove(units[-1])
    with pytest.raises(ArrayJobError, match=r"task\(s\) 1 of 3 have not finished .* sbatch --array=1 slurm/preprocess.sh"):
        merge(files, str(tok), prefix, options=options)
    assert not os.path.exists(prefix + ".bin")
    again = run_task(files, str(tok), prefix, 1, None, workers=0, options=options, progress=False)  # count from the layout
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in task1.glob("*.bin")}
    redone = units[-1].name.replace(".json", ".bin")
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert [k for k in after if after[k][1] != before[k][1]] == [redone]  # only the unfinished unit ran again
    assert again["num_tasks"] == 3
    report = merge(files, str(tok), prefix, options=options)
    single = preprocess(files, str(tok), str(tmp_path / "single"), workers=0, progress=False)
    assert Path(prefix + ".bin").read_bytes() == Path(str(tmp_path / "single") + ".bin").read_bytes()
    assert report["documents"] == single["documents"] and not os.path.exists(prefix + ".tasks")
    with pytest.raises(ArrayJobError, match="planned for 3 tasks, not 4"):
        run_task(files, str(tok), str(tmp_path / "q"), 0, 3, workers=0, options=options, progress=False)
        run_task(files, str(tok), str(tmp_path / "q"), 1, 4, workers=0, options=options, progress=False)


def test_task_shares_are_contiguous_and_balanced():
    assert task_units([10] * 8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert task_units([10, 10], 4) == [[], [0], [], [1]]
    assert task_units([126, 124, 126, 124, 126, 124, 126, 124], 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    shares = task_units([5, 30, 1, 1, 1, 40, 2, 20], 3)
    assert [u for s in shares for u in s] == list(range(8))
    assert shares == [[0, 1], [2, 3, 4, 5], [6, 7]]


def test_candidates_are_the_documents_sharing_a_key_or_band(tmp_path):
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**61, size=(6, 64), dtype=np.uint64)
    sig[3, 11:22] = sig[0, 11:22]  # doc 3 shares band 1 (rows 11-21 of 5 x 11) with doc 0
    sig[4, 11:22] = sig[0, 11:22] + np.uint64(1)  # a changed band: no share
    keys = np.arange(6, dtype=np.uint64)
    keys[5] = keys[1]  # doc 5 is an exact copy of doc 1 by key
    bases = []
    for u, rows in enumerate((slice(0, 2), slice(2, 6))):
        base = str(tmp_path / f"{u:05d}")
        np.savez(base + ".meta.npz", key=keys[rows], sig=sig[rows])
        np.save(base + ".bands.npy", band_hashes(sig[rows], 5, 11))
        bases.append(base)
    for per_pass in (1000, 7):
        candidates, passes = find_candidates(bases, [2, 4], True, 5, per_pass)
        assert candidates.tolist() == [True, True, False, True, False, True], per_pass
    assert find_candidates(bases, [2, 4], False, 5)[0].tolist() == [True, False, False, True, False, False]
