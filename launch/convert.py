"""Turn a training checkpoint into a Hugging Face model directory (any layout: ZeRO-3 and TP shards).

    python launch/convert.py --checkpoint runs/ko/checkpoints --out runs/ko/hf            # from `latest`
    python launch/convert.py --checkpoint runs/ko/checkpoints/global_step2000 --out hf2000

The result (config.json, safetensors, tokenizer files) loads with
transformers.AutoModelForCausalLM.from_pretrained and with megakor's own model.init_from.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megakor.config import ConfigError  # noqa: E402
from megakor.train.checkpointing import convert_checkpoint  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint.dir (uses its latest) or one global_step* directory")
    ap.add_argument("--out", required=True, help="HF directory to write")
    args = ap.parse_args(argv)
    try:
        out = convert_checkpoint(args.checkpoint, args.out)
    except (FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
