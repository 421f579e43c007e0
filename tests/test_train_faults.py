"""Faults a long run must survive (megakor.train.faults, megakor.train.checkpointing), on CPU with gloo:

  whatever a crash leaves in checkpoint.dir (stale .tmp-* dirs, `latest` naming nothing or a broken
  checkpoint, a truncated or bit-flipped file) resumes from the newest checkpoint matching its manifest;
  ranks SIGKILLed in the middle of a save resume from a verified checkpoint, bitwise on course;
  SIGUSR1 reaching one rank only stops every rank after the same step, saved, with the requeue code;
  a NaN loss on one rank skips the step on every rank (weights and AdamW state untouched, data moved on),
  counted in train/skipped_steps, and train.max_skipped_steps in a row stop the run with exit status 3.
The Slurm side (sbatch, scancel --signal=USR1, requeue) is in test_slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from dist_utils import REPO, free_port, launch, rank_env, read_scalars, write_corpus
from megakor.config import ConfigError
from megakor.train import checkpointing
from megakor.train.checkpointing import MANIFEST, STATE_FILE, check_resumable, latest_tag, resume_point, write_manifest

CONFIG = "configs/runs/tiny_cpu.yaml"
LAYOUT = {"world_size": 2, "tp": 1, "pp": 1, "dp": 2}


# ---- checkpoint.dir after crashes (no processes) -------------------------------------------------

def _publish_fake(root: Path, step: int) -> Path:
    tmp = root / f".tmp-global_step{step}"
    (tmp / "model").mkdir(parents=True)
    (tmp / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
    (tmp / "model" / "tp00-00000.safetensors").write_bytes(os.urandom(512))
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "layout": LAYOUT}))
    write_manifest(tmp)
    final = root / f"global_step{step}"
    os.rename(tmp, final)
    (root / "latest").write_text(final.name)
    return final


def test_whatever_a_crash_leaves_behind_resumes_from_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    assert resume_point(root, 2, 1, 1) == (None, []) and check_resumable(tmp_path / "absent", 2, 1, 1) is None
    for step in (3, 6):
        _publish_fake(root, step)
    # Debris of interrupted saves and prunes, and a save killed before its manifest.
    (root / ".tmp-global_step9" / "model").mkdir(parents=True)
    (root / ".tmp-pruned-global_step1").mkdir()
    (root / "latest.tmp").write_text("global_step9")
    assert latest_tag(root) == "global_step6" and resume_point(root, 2, 1, 1) == ("global_step6", [])

    (root / "latest").write_text("global_step9")  # names nothing
    assert resume_point(root, 2, 1, 1) == ("global_step6", [])
    (root / "latest").unlink()  # killed between the rename and `latest`
    assert check_resumable(root, 2, 1, 1)["step"] == 6

    # Same size, one byte changed: only the hashes (after the process group exists) can tell.
    optim = root / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[100] ^= 0xFF
    optim.write_bytes(bytes(data))
    assert check_resumable(root, 2, 1, 1)["step"] == 6
    tag, skipped = resume_point(root, 2, 1, 1)
    assert tag == "global_step3" and skipped == [
        f"global_step6: {optim.name} does not match its sha256 in {MANIFEST}"]

    optim.write_bytes(bytes(data[:1000]))  # truncated: seen before any process group
    assert check_resumable(root, 2, 1, 1)["step"] == 3
    assert resume_point(root, 2, 1, 1)[1] == [f"global_step6: {optim.name} has 1000 bytes, its manifest says 4096"]

    (root / "global_step3" / MANIFEST).unlink()
    with pytest.raises(ConfigError, match=r"holds no complete checkpoint \(global_step6: .*; global_step3: it has no "
                                          r"manifest.json .*\); move the broken global_step\* directories away"):
        check_resumable(root, 2, 1, 1)
    with pytest.raises(ConfigError, match="written by 2 processes"):
        check_resumable(_publish_fake(tmp_path / "other", 1).parent, 4, 1, 1)


def test_publishing_again_and_pruning_never_leave_a_broken_global_step(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    for step in (1, 2, 3):
        _publish_fake(root, step)
    again = root / ".tmp-global_step3"  # the same step saved again, e.g. after resuming past a corrupt one
    (again / "model").mkdir(parents=True)
    (again / STATE_FILE).write_text(json.dumps({"step": 3, "layout": LAYOUT, "again": True}))
    write_manifest(again)
    checkpointing._publish(root, again, "global_step3")
    checkpointing._prune(root, 2, "global_step3")
    assert sorted(p.name for p in root.iterdir()) == ["global_step2", "global_step3", "latest"]
    assert checkpointing.read_state(root, "global_step3")["again"] and latest_tag(root) == "global_step3"


# ---- comparing checkpoints tensor by tensor ------------------------------------------------------

def tensors(obj, prefix=""):
    """Every tensor inside a (nested) checkpoint object, lists and tuples included, by path."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}[{i}]")


def optimizer_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's ZeRO optimizer file: AdamW moments and step, and the fp32 master
    weights (ZeRO-3's `fp32_flat_groups`, a list)."""
    out = {}
    for f in sorted(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        out.update({f"{f.name}{k}": t for k, t in tensors(torch.load(f, map_location="cpu", weights_only=False))})
    return out


def differences(a: Path, b: Path) -> list[str]:
    """Names of the tensors (model export, optimizer state) that are not bitwise equal in two checkpoints."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(t / "model" / "tp00-00000.safetensors")) for t in (a, b))
    oa, ob = optimizer_tensors(a), optimizer_tensors(b)
    assert any("fp32_flat_groups[" in k for k in oa), sorted(oa)[:10]  # the master weights are compared too
    assert wa.keys() == wb.keys() and oa.keys() == ob.keys(), (sorted(set(oa) ^ set(ob))[:5])
    return [k for k in wa if not torch.equal(wa[k], wb[k])] + [k for k in oa if not torch.equal(oa[k], ob[k])]


# ---- real runs: 2 ranks, gloo, ZeRO-3 -----------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return root, [f"data.sources=[{{path: {write_corpus(root / 'train', 300, vocab=512, seed=0)}}}]",
                  f"data.cache_dir={root / 'cache'}"]


def _run(corpus, name: str, *overrides: str, env: dict | None = None) -> tuple[list[tuple[int, str]], Path]:
    root, common = corpus
    d = root / name
    argv = ["launch/train.py", "--config", CONFIG, *common, f"checkpoint.dir={root / 'ck'}",
            f"logging.tensorboard_dir={d / 'tb'}", *overrides]
    return launch(2, argv, timeout=180, env=env), d / "tb"


def _rank0(outputs, rc: int) -> str:
    for r, (code, out) in enumerate(outputs):
        assert code == rc, f"rank {r} exited {code}, not {rc}:\n{out[-4000:]}"
    return outputs[0][1]


def test_ranks_killed_during_a_save_resume_from_a_verified_checkpoint(corpus):
    ck = corpus[0] / "ck"
    common = ["train.steps=9", "checkpoint.every=3", "checkpoint.keep=3"]
    outputs, tb1 = _run(corpus, "killed", *common, env={"MEGAKOR_TEST_KILL_DURING_SAVE": "9"})
    out = _rank0(outputs, -signal.SIGKILL)
    assert "SIGKILL while writing checkpoint 9" in out
    assert (ck / ".tmp-global_step9").is_dir() and not (ck / "global_step9").exists()
    assert (ck / "latest").read_text() == "global_step6"
    first = read_scalars(tb1, "train/loss")
    assert sorted(first) == list(range(1, 10))

    # On top of the half-written global_step9, `latest` names a checkpoint whose optimizer state lost a
    # bit (same size: only the hashes, checked by the ranks together, can tell): resume from global_step3.
    optim = ck / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optim.write_bytes(bytes(data))
    out = _rank0(_run(corpus, "resumed", *common)[0], 0)
    assert f"WARNING: skipping checkpoint global_step6: {optim.name} does not match its sha256" in out
    assert f"resumed from {ck / 'global_step3'} at step 3" in out and "global_step9:" not in out
    second = read_scalars(corpus[0] / "resumed" / "tb", "train/loss")
    assert sorted(second) == list(range(4, 10)) and all(second[s] == first[s] for s in second)  # bitwise
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["global_step3", "global_step6", "global_step9"]
    assert checkpointing.resume_point(ck, 2, 1, 1) == ("global_step9", [])  # global_step6 published again, whole
    assert checkpointing.problem(ck / "global_step6") is None and not list(ck.glob(".tmp-*"))


def test_usr1_on_one_rank_stops_every_rank_after_the_same_step_saved(corpus, tmp_path):
    root, common = corpus
    ck = tmp_path / "ck"
    argv = ["launch/train.py", "--config", CONFIG, *common, "train.steps=200", "checkpoint.every=0",
            f"checkpoint.dir={ck}", f"logging.tensorboard_dir={tmp_path / 'tb'}"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *argv], cwd=REPO, env=rank_env(r, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    watchdog = threading.Timer(180, lambda: [p.kill() for p in procs])  # a hung rank fails the test, not CI
    watchdog.start()
    try:
        seen = ""
        while "step 2/200" not in seen:
            line = procs[0].stdout.readline()
            assert line, seen[-3000:]
            seen += line
        procs[1].send_signal(signal.SIGUSR1)  # rank 0 never gets a signal
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        watchdog.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [42, 42], outs[1][-3000:]
    state = checkpointing.read_state(ck, (ck / "latest").read_text())
    stopped = state["step"]
    assert 2 <= stopped < 200 and state["consumed_samples"] == 4 * stopped
    assert f"stop requested (SIGUSR1/SIGTERM) at step {stopped}" in seen + outs[0]
    assert sorted(read_scalars(tmp_path / "tb", "train/loss")) == list(range(1, stopped + 1))


def test_nan_steps_are_skipped_on_every_rank_and_too_many_in_a_row_stop_the_run(corpus, tmp_path):
    from safetensors.torch import load_file

    ck = tmp_path / "ck"
    outputs, tb = _run(corpus, "nan", "train.steps=10", "checkpoint.every=1", "checkpoint.keep=0",
                       "train.max_skipped_steps=3", f"checkpoint.dir={ck}",
                       env={"MEGAKOR_INJECT_NAN_STEP": "3,5-7"})  # on rank 0 only
    out = _rank0(outputs, 3)
    assert (f"error: steps 5-7 all had a non-finite loss or gradient norm (train.max_skipped_steps=3 in a row); "
            f"stopped without saving, the last checkpoint is {ck / 'global_step6'}") in out
    assert read_scalars(tb, "train/skipped_steps") == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3, 7: 4}
    loss = read_scalars(tb, "train/loss")
    assert [s for s in loss if loss[s] != loss[s]] == [3, 5, 6, 7]  # NaN exactly where injected
    assert sorted(read_scalars(tb, "train/grad_norm")) == [1, 2, 4]
    assert (ck / "latest").read_text() == "global_step6" and not (ck / "global_step7").exists()

    def same_weights_and_adamw(a: str, b: str) -> bool:
        return not differences(ck / a, ck / b)

    assert same_weights_and_adamw("global_step2", "global_step3")  # rank 1's finite loss did not step either
    assert not same_weights_and_adamw("global_step3", "global_step4")
    assert same_weights_and_adamw("global_step4", "global_step6")
    for step in (3, 6):
        state = checkpointing.read_state(ck, f"global_step{step}")
        assert state["consumed_samples"] == 4 * step  # the bad batches are not retried
    assert checkpointing.read_state(ck, "global_step6")["consecutive_skipped_steps"] == 2


def test_resume_after_usr1_at_step_3_of_10_is_bitwise_the_uninterrupted_run(corpus, tmp_path):
    """SIGUSR1 reaches rank 1 as step 3 begins (test hook); both ranks save after step 3 and exit 42; the
    same command resumes to step 10. Losses of steps 4-10 and every tensor of the final checkpoint (the
    model, AdamW's moments and steps, the fp32 master weights, every rank's partition) equal the
    uninterrupted run's bit for bit."""
    root, common = corpus
    runs = {name: ["launch/train.py", "--config", CONFIG, *common, "train.steps=10", "checkpoint.every=0",
                   f"checkpoint.dir={tmp_path / name / 'ck'}"] for name in ("whole", "interrupted")}
    _rank0(launch(2, [*runs["whole"], f"logging.tensorboard_dir={tmp_path / 'whole' / 'tb'}"], timeout=180), 0)
    out = _rank0(launch(2, [*runs["interrupted"], f"logging.tensorboard_dir={tmp_path / 'interrupted' / 'tb1'}"],
                        timeout=180, env={"MEGAKOR_TEST_USR1_AT_STEP": "3"}), 42)
    assert "stop requested (SIGUSR1/SIGTERM) at step 3" in out
    ck = tmp_path / "interrupted" / "ck"
    assert checkpointing.latest_tag(ck) == "global_step3"
    out = _rank0(launch(2, [*runs["interrupted"], f"logging.tensorboard_dir={tmp_path / 'interrupted' / 'tb2'}"],
                        timeout=180), 0)
    assert f"resumed from {ck / 'global_step3'} at step 3" in out
    whole = read_scalars(tmp_path / "whole" / "tb", "train/loss")
    first = read_scalars(tmp_path / "interrupted" / "tb1", "train/loss")
    second = read_scalars(tmp_path / "interrupted" / "tb2", "train/loss")
    assert sorted(first) == [1, 2, 3] and sorted(second) == list(range(4, 11))
    assert all(first[s] == whole[s] for s in first) and all(second[s] == whole[s] for s in second)  # bitwise
    final = "global_step10"
    n = len(optimizer_tensors(tmp_path / "whole" / "ck" / final))
    assert differences(tmp_path / "whole" / "ck" / final, ck / final) == []
    print(f"\nresumed at step 3 of 10: losses 4-10 and {n} optimizer tensors (fp32 master weights included) "
          "bitwise equal")
