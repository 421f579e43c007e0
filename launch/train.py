"""Continued pretraining under DeepSpeed: ZeRO-3 over data × tensor parallelism, or the pipeline mode
(parallel.pipeline > 1, ZeRO 0/1) for data × pipeline × tensor parallelism.

    # one process (CPU or one GPU)
    python launch/train.py --config configs/runs/tiny_cpu.yaml data.sources="[{path: cache/ko}]"
    # one node, 8 GPUs, TP=2 × DP=4
    deepspeed --num_gpus 8 launch/train.py --config configs/runs/llama3.1_8b_korean.yaml parallel.tensor=2
    # torchrun / Open MPI work the same way
    torchrun --nproc-per-node 2 launch/train.py --config configs/runs/tiny_cpu.yaml
    mpirun -np 2 python launch/train.py --config configs/runs/tiny_cpu.yaml
    # Slurm: sbatch slurm/pretrain.sh CONFIG [section.key=value ...]

Any config field can be overridden as section.key=value (values are YAML), before or after --config.
Training resumes from the newest complete checkpoint in checkpoint.dir. On a machine without a GPU, set
DS_ACCELERATOR=cpu.
Exit status: 0 done; 2 a configuration mistake, reported in one sentence before any process started
talking or any weight was read; 3 train.max_skipped_steps non-finite steps in a row; $MEGAKOR_REQUEUE_EXIT
(default 42) stopped by SIGUSR1/SIGTERM after saving a checkpoint: run the same command again to resume;
1 a rank failed: its error is printed once and every rank ends (the launcher stops the others).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megakor.config import ConfigError, load_config  # noqa: E402
from megakor.parallel import shutdown_distributed  # noqa: E402
from megakor.train import faults  # noqa: E402
from megakor.train.loop import setup_logging, train  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="run config YAML (see configs/runs/)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=20")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_intermixed_args(argv)  # overrides on either side of --config
    setup_logging()
    try:
        result = train(load_config(args.config, args.overrides))
    except ConfigError as e:
        return faults.report(e, 2)
    except faults.NumericalFault as e:
        return faults.report(e, 3)
    except Exception as e:  # noqa: BLE001 - one rank's failure must end every rank (faults.end_job)
        faults.end_job(e, 1)
        return 1
    finally:
        shutdown_distributed()
    return faults.requeue_exit_code() if result["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
