"""launch/train.py refuses impossible layouts and bad input with one sentence and exit status 2, before
any process group exists."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch.distributed as dist

from dist_utils import REPO, rank_env

CONFIG = "configs/runs/tiny_cpu.yaml"


def _train_main():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _cases(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    return [  # (world size, overrides, the sentence's essential part)
        (2, ["parallel.tensor=3"], "2 processes cannot be split into parallel.tensor=3 × parallel.pipeline=1; "
                                   "use a world size that is a multiple of 3"),
        (4, ["parallel.tensor=4"], "parallel.tensor=4 does not divide num_key_value_heads=2; use 1, 2"),
        (2, ["train.global_batch=3"], "train.global_batch=3 is not divisible by train.micro_batch=1 × data-parallel "
                                      "size 2; use a multiple of 2"),
        (2, ["parallel.pipeline=2"], "parallel.zero_stage=3 cannot be combined with parallel.pipeline=2"),
        (4, ["parallel.pipeline=4", "parallel.zero_stage=1"], "parallel.pipeline=4 exceeds the model's 2 layers"),
        (2, [f"deepspeed.config={ds}"], "sets train_micro_batch_size_per_gpu=4 but train.micro_batch=1 gives 1"),
        (2, ["parallel.zero_stage=2", "parallel.offload_params=true"], "parallel.offload_params needs parameter "
                                                                       "partitioning; set parallel.zero_stage=3"),
        (1, ["model.init_from=/nonexistent"], "model.init_from='/nonexistent' is neither an existing path nor a preset"),
        (1, [], "data.sources is empty; list at least one"),
        (1, ["data.sources=[{path: /nonexistent/raw.jsonl}]"], "input /nonexistent/raw.jsonl matches no file or directory"),
        (1, [f"data.sources=[{{path: {ds}}}]"], "is not a preprocessed prefix, and there is no tokenizer"),
        (1, ["train.freeze=new_embeddings_only"], "train.freeze=new_embeddings_only needs to know which vocabulary rows are new"),
    ]


def test_invalid_layouts_and_inputs_fail_in_one_sentence(tmp_path, monkeypatch, capsys):
    main = _train_main()
    for world, overrides, sentence in _cases(tmp_path):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        assert main(["--config", str(REPO / CONFIG), *overrides, f"checkpoint.dir={tmp_path / 'ck'}",
                     "logging.tensorboard_dir="]) == 2, overrides
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and sentence in err, (overrides, err)
        assert not dist.is_initialized()
    assert not (tmp_path / "ck").exists()


def test_a_bad_layout_exits_2_from_the_command_line_without_a_rendezvous(tmp_path):
    env = rank_env(0, 4, 0)
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # joining a process group would fail: it must not be tried
        env.pop(key)
    r = subprocess.run([sys.executable, "launch/train.py", "--config", CONFIG, "parallel.tensor=3",
                        f"checkpoint.dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == ("error: 4 processes cannot be split into parallel.tensor=3 × parallel.pipeline=1; "
                        "use a world size that is a multiple of 3\n")


def test_convert_cli_reports_a_missing_checkpoint(tmp_path):
    from megakor.train.checkpointing import convert_checkpoint

    with pytest.raises(FileNotFoundError, match="is neither a checkpoint.dir with a 'latest' file nor a global_step"):
        convert_checkpoint(tmp_path, tmp_path / "out")
