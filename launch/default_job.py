"""The default job on the real SmolLM2-135M checkpoint, on CPU (see megakor/default_job.py).

    python launch/default_job.py                       # everything under runs/default/
    python launch/default_job.py --new-tokens 8000 --out runs/try2
    python launch/default_job.py --recipe plain --out runs/plain   # any configs/recipes/*.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from megakor.default_job import DefaultJob, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(DefaultJob):
        # Annotations are strings (PEP 563); "int | None" options default to the recipe's value.
        kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(DefaultJob(**vars(ns)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
