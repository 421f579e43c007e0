"""The fine-tuning job on CPU: SmolLM2 learns Korean <-> English translation (see megakor/finetune_job.py).

    python launch/finetune_job.py                          # everything under runs/sft/
    python launch/finetune_job.py --init-from runs/default/hf --steps 60 --out runs/sft2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from megakor.finetune_job import FinetuneJob, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(FinetuneJob):
        kind = {"int": int, "float": float}.get(f.type, str)  # annotations are strings (PEP 563)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(FinetuneJob(**vars(ns)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
