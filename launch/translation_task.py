"""Build the GIMP-manual Korean <-> English translation task (Debian gimp-help-ko / gimp-help-en).

    python launch/translation_task.py --out runs/sft/task
    # → train.jsonl (both directions), heldout.ko-en.jsonl, heldout.en-ko.jsonl, report.json
"""

from __future__ import annotations

import argparse
import json
import sys

from megakor.corpora import CorpusUnavailable
from megakor.tasks.translation import build_translation_task


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the task files")
    ap.add_argument("--cache", default=None, help="download cache (default $MEGAKOR_CACHE or ~/.cache/megakor)")
    args = ap.parse_args(argv)
    try:
        report = build_translation_task(args.out, args.cache)
    except CorpusUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
