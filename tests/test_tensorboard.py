"""What a user sees: TensorBoard's own server, with its default flags (the Rust fast loader), shows every
curve the README documents, with the values of the run's exact metrics file (to float32), and a resumed
run shows each step once.

One tiny run on 1 process (the llama3-style test checkpoint, so eval bits per character exist): 5 steps
saving at steps 3 and 5; the step-5 checkpoint is then removed, as if the job had died after logging
steps 4-5 but before saving them, and a second run resumes from step 3 to step 6.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from conftest import make_hf_checkpoint
from dist_utils import check, free_port, launch, write_corpus, write_texts
from megakor.train.metrics import MetricsFile, read_scalars

CONFIG = "configs/runs/tiny_cpu.yaml"
TAGS = ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tflops_per_device",
        "train/memory_gb", "eval/loss", "eval/ko_loss", "eval/ko_bits_per_char")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    hf = make_hf_checkpoint(root / "hf", "llama3")
    from megakor.tokenizer import load_tokenizer

    tok = load_tokenizer(hf)
    write_texts(root / "heldout", tok, ["대한민국은 민주공화국이다.", "The quick brown fox jumps over the lazy dog.",
                                        "모든 국민은 법 앞에 평등하다."], 300)
    train = write_corpus(root / "train", n_docs=100, vocab=300, seed=0, eos=tok.eos_token_id)
    common = [f"model.init_from={hf}", f"data.sources=[{{path: {train}}}]",
              f"data.eval=[{{path: {root / 'heldout'}, name: ko}}]", f"data.cache_dir={root / 'cache'}",
              f"checkpoint.dir={root / 'ck'}", f"logging.tensorboard_dir={root / 'tb'}", "train.eval_every=2",
              "checkpoint.every=3", "checkpoint.keep=0"]
    check(launch(1, ["tests/dist_utils.py", CONFIG, json.dumps([common + ["train.steps=5"]])], timeout=300))
    first = read_scalars(root / "tb")
    shutil.rmtree(root / "ck" / "global_step5")  # died after logging steps 4-5, before saving them
    check(launch(1, ["tests/dist_utils.py", CONFIG, json.dumps([common + ["train.steps=6", "optim.lr=5e-4"]])],
                 timeout=300))
    return root, first


def _tensorboard(logdir):
    """A real `tensorboard` server with its default flags (the fast loader) on a free port."""
    port = free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "tensorboard"), "--logdir", str(logdir),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _served_scalars(base: str, deadline: float) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as the server answers them, once it has loaded every tag."""
    while True:
        try:
            tags = _get(f"{base}/data/plugin/scalars/tags")
            if tags and all(t in next(iter(tags.values())) for t in TAGS):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"tensorboard served no complete scalar set within the deadline: {tags if 'tags' in dir() else None}")
        time.sleep(1)
    (run_name, run_tags), = tags.items()
    out = {}
    for tag in run_tags:
        q = urllib.parse.urlencode({"run": run_name, "tag": tag})
        out[tag] = {step: value for _, step, value in _get(f"{base}/data/plugin/scalars/scalars?{q}")}
    return out


def test_tensorboard_default_server_shows_every_curve_with_the_metrics_file_values(run):
    root, first = run
    exact = read_scalars(root / "tb")
    proc, base = _tensorboard(root / "tb")
    try:
        served = _served_scalars(base, time.monotonic() + 120)
    finally:
        proc.kill()
        log = proc.communicate()[0]
    assert "Using experimental fast data loading logic" in log  # the Rust data server, as users get it
    for tag in TAGS:
        want = exact[tag]
        assert sorted(served[tag]) == sorted(want), (tag, served[tag], want)  # each step once after the resume
        for step, value in want.items():
            assert served[tag][step] == float(np.float32(value)), (tag, step)
    assert sorted(exact["train/loss"]) == [1, 2, 3, 4, 5, 6] and sorted(exact["eval/loss"]) == [2, 4, 6]
    # Steps 4-5 come from the resumed run (half the learning rate), not the interrupted one.
    assert exact["train/lr"][4] == pytest.approx(5e-4) and first["train/lr"][4] == pytest.approx(1e-3)
    assert exact["train/loss"][3] == first["train/loss"][3] and exact["train/loss"][5] != first["train/loss"][5]


def test_metrics_file_keeps_exact_values_and_drops_later_steps_and_torn_lines_on_resume(tmp_path):
    f = MetricsFile(tmp_path)
    value = 1 / 3  # not representable in float32
    for step in (1, 2, 3):
        f.write(step, {"train/loss": value * step})
    f.write(2, {"eval/loss": 0.5})
    f.close()
    with open(tmp_path / MetricsFile.NAME, "a") as torn:
        torn.write('{"step": 4, "train/lo')
    assert read_scalars(tmp_path, "train/loss") == {1: value, 2: 2 * value, 3: value * 3}  # the torn line skipped
    MetricsFile(tmp_path, resume_step=2).close()
    assert read_scalars(tmp_path) == {"train/loss": {1: value, 2: 2 * value}, "eval/loss": {2: 0.5}}
    rows = [json.loads(line) for line in (tmp_path / MetricsFile.NAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2] and all(r["time"] > 1.7e9 for r in rows)
    # A skipped step's NaN loss is written as JSON null and read back as NaN.
    f = MetricsFile(tmp_path, resume_step=2)
    f.write(3, {"train/loss": float("nan"), "train/lr": 1e-3})
    f.close()
    assert json.loads((tmp_path / MetricsFile.NAME).read_text().splitlines()[-1])["train/loss"] is None
    assert np.isnan(read_scalars(tmp_path, "train/loss")[3])
