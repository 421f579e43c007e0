"""The fine-tuning job on CPU: SmolLM2 learns Korean <-> English translation (see megakor/finetune_job.py).

    python launch/finetune_job.py                          # everything under runs/sft/
    python launch/finetune_job.py --init-from runs/default/hf --steps 60 --out runs/sft2
"""

from __future__ import annotations

import logging
import sys

from megakor.config import parse_job_arguments
from megakor.finetune_job import FinetuneJob, run


def main(argv=None) -> int:
    job = parse_job_arguments(FinetuneJob, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
