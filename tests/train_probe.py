"""`python tests/train_probe.py ARGS...` = `python launch/train.py ARGS...`, with every weight-file open and
process-group start reported on stderr ("PROBE: opened FILE", "PROBE: process group"), so tests can
assert that a mistake was refused before either happened."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def install(record, set_attr=setattr) -> None:
    """Call `record(what)` whenever a weight file is opened or a process group is started (`set_attr`:
    pytest's monkeypatch.setattr, to undo it after a test)."""
    import safetensors
    import torch
    import torch.distributed as dist

    originals = {"safe_open": safetensors.safe_open, "load": torch.load, "init": dist.init_process_group}

    def safe_open(path, *a, **k):
        record(f"opened {path}")
        return originals["safe_open"](path, *a, **k)

    def load(f, *a, **k):
        record(f"opened {f}")
        return originals["load"](f, *a, **k)

    def init_process_group(*a, **k):
        record("process group")
        return originals["init"](*a, **k)

    import safetensors.torch

    # HFCheckpoint imports safe_open from `safetensors` when it opens a file; load_file uses the other.
    set_attr(safetensors, "safe_open", safe_open)
    set_attr(safetensors.torch, "safe_open", safe_open)
    set_attr(torch, "load", load)
    set_attr(dist, "init_process_group", init_process_group)


def train_main():
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    install(lambda what: print(f"PROBE: {what}", file=sys.stderr, flush=True))
    sys.exit(train_main()(sys.argv[1:]))
