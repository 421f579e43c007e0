"""The default job on the real SmolLM2-135M checkpoint, on CPU (see megakor/default_job.py).

    python launch/default_job.py                       # everything under runs/default/
    python launch/default_job.py --new-tokens 8000 --out runs/try2
    python launch/default_job.py --recipe plain --out runs/plain   # any configs/recipes/*.yaml
"""

from __future__ import annotations

import logging
import sys

from megakor.config import ConfigError, parse_job_arguments
from megakor.default_job import DefaultJob, run


def main(argv=None) -> int:
    job = parse_job_arguments(DefaultJob, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(job)
    except ConfigError as e:  # a setting or the machine cannot carry the job: one sentence, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
