"""Memory per GPU a run expects, and why: model states per ZeRO stage, activations, loss buffers.

    # the 8B recipe on 4 nodes × 8 GPUs (its checkpoint lives on the cluster: take the preset's shape)
    python launch/plan.py configs/runs/llama3.1_8b_korean.yaml --nodes 4 --gpus-per-node 8 \\
        --arch llama3.1-8b --vocab-size 136256
    # what if: micro-batch 4 without activation checkpointing, as JSON
    python launch/plan.py configs/runs/llama3.1_8b_korean.yaml train.micro_batch=4 \\
        model.activation_checkpointing=false --nodes 4 --arch llama3.1-8b --json plan.json

Any config field can be overridden as section.key=value. The architecture is read from model.init_from
when it is on this machine (HF directory, .gguf, preset); otherwise --arch names a preset. The method
and every term are documented in megakor/plan.py. Exit status 2 on a configuration mistake.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # planning needs no GPU; DeepSpeed is only imported

from megakor import plan  # noqa: E402
from megakor.config import ConfigError, load_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="run config YAML (see configs/runs/)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.micro_batch=4")
    ap.add_argument("--nodes", type=int, default=1, help="nodes in the job")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    ap.add_argument("--arch", help="preset whose architecture to plan with when model.init_from is not here")
    ap.add_argument("--vocab-size", type=int, help="vocabulary after extension (default: the model's, or "
                    "tokenizer.path's when that tokenizer is here and larger)")
    ap.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    ap.add_argument("--json", help="also write the plan here as JSON")
    a = ap.parse_intermixed_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        args, name, notes = plan.resolve_model_args(cfg, a.arch, a.vocab_size)
        result = plan.plan(cfg, args, a.nodes, a.gpus_per_node, a.gpu_memory_gib, arch=name, notes=notes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.format_plan(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
