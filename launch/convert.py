"""Conversions into a Hugging Face model directory.

    # a training checkpoint (any layout: ZeRO-3, TP shards, pipeline stages) → HF
    python launch/convert.py --checkpoint runs/ko/checkpoints --out runs/ko/hf            # from `latest`
    python launch/convert.py --checkpoint runs/ko/checkpoints/global_step2000 --out hf2000
    # a GGUF file (llama.cpp; dequantised, Q/K permutation undone) → HF
    python launch/convert.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
    # an HF checkpoint grown to a vocabulary-extended tokenizer (new rows: subword mean, mean or random)
    python launch/convert.py --model runs/smollm2 --tokenizer runs/ko-tokenizer --init subword --out runs/smollm2-ko

Every result (config.json, safetensors, tokenizer files) loads with
transformers.AutoModelForCausalLM.from_pretrained and with megakor's own model.init_from.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megakor.config import ConfigError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint.dir (uses its latest) or one global_step* directory")
    src.add_argument("--gguf", help="a .gguf file")
    src.add_argument("--model", help="an HF checkpoint directory to grow to --tokenizer's vocabulary")
    ap.add_argument("--tokenizer", help="with --model: the extended tokenizer directory")
    ap.add_argument("--init", default="subword", choices=("subword", "mean", "random"),
                    help="with --model: initialisation of the new rows")
    ap.add_argument("--out", required=True, help="HF directory to write")
    args = ap.parse_args(argv)
    if args.model and not args.tokenizer:
        ap.error("--model needs --tokenizer (the extended tokenizer directory)")
    try:
        from megakor.checkpoint.source import resolve_model_source

        flag, spec, kind = next((f, v, k) for f, v, k in (("--checkpoint", args.checkpoint, "training"),
                                                          ("--gguf", args.gguf, "gguf"), ("--model", args.model, "hf"))
                                if v)
        source = resolve_model_source(spec, flag)  # the same resolver as model.init_from
        if source.kind != kind:
            what = {"preset": "a preset", "hf": "an HF directory", "gguf": "a .gguf file", "training": "a training "
                    "checkpoint"}
            flags = {"training": "--checkpoint", "gguf": "--gguf", "hf": "--model"}
            raise ConfigError(f"{flag}={spec} is {what[source.kind]}, not {what[kind]}"
                              + (f"; pass it with {flags[source.kind]}" if source.kind in flags else ""))
        source.check_files()
        if kind == "training":
            from megakor.train.checkpointing import convert_checkpoint

            out = convert_checkpoint(source.path, args.out)
        elif kind == "gguf":
            from megakor.checkpoint.gguf import convert_gguf_to_hf

            out = convert_gguf_to_hf(source.path, args.out)
        else:
            from megakor.checkpoint.resize import resize_checkpoint_vocab

            out = resize_checkpoint_vocab(source.open(), source.tokenizer_dir() or source.path, args.tokenizer,
                                          args.out, args.init)
    except (FileNotFoundError, FileExistsError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
