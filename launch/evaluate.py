"""Bits per character (and byte) of a model on held-out text, tokenizer-independent.

    python launch/evaluate.py --model HF_DIR --data heldout.jsonl --seq-len 2048 --json out.json
    python launch/evaluate.py --model model.gguf --data ko=ko.jsonl,en=en.jsonl
    python launch/evaluate.py --model runs/ko/checkpoints --data ko=ko.jsonl     # latest training checkpoint

Task sets (JSONL of chat `messages` or `prompt`/`response`) in generation mode: greedy (or beam) answers
scored with chrF against the references, plus the response-only loss:

    python launch/evaluate.py --model runs/sft/hf --generate \
        --data ko_en=runs/sft/task/heldout.ko-en.jsonl,en_ko=runs/sft/task/heldout.en-ko.jsonl --max-docs 50
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from megakor.checkpoint.source import build_model
from megakor.evaluate import evaluate_file, evaluate_task, read_task_examples
from megakor.tokenizer import tokenizer_for


def parse_data(spec: str) -> dict[str, str]:
    """'file.jsonl' → {'': file}; 'ko=a.jsonl,en=b.jsonl' → named splits."""
    if "=" not in spec:
        return {"": spec}
    out = {}
    for part in spec.split(","):
        name, _, path = part.partition("=")
        if not name or not path:
            raise SystemExit(f"--data entry '{part}' is not NAME=PATH; write e.g. ko=ko.jsonl,en=en.jsonl")
        out[name] = path
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint directory, .gguf file, or a training checkpoint")
    ap.add_argument("--data", required=True, help="JSONL file, or NAME=FILE,NAME=FILE")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    ap.add_argument("--seq-len", type=int, default=2048, help="chunk length L in tokens")
    ap.add_argument("--max-docs", type=int, default=None, help="evaluate only the first N documents")
    ap.add_argument("--batch-size", type=int, default=4, help="packed rows per forward pass")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--generate", action="store_true", help="task sets: generate answers, score chrF and response loss")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="--generate: tokens generated per answer at most")
    ap.add_argument("--num-beams", type=int, default=1, help="--generate: 1 = greedy, more = beam search")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.generate:
        return _generate_mode(args)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, ckpt = build_model(args.model, device=device)
        tokenizer = tokenizer_for(args.model, args.tokenizer, ckpt)
        splits = parse_data(args.data)
        results = {name: evaluate_file(model, tokenizer, path, args.seq_len, args.max_docs, args.batch_size,
                                       args.text_field) for name, path in splits.items()}
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = results[""] if list(results) == [""] else results
    for name, r in results.items():
        print(f"{name or 'data'}: loss {r['loss']:.4f} nats/token  bits/char {r['bits_per_char']:.4f}  "
              f"bits/byte {r['bits_per_byte']:.4f}  tokens {r['tokens']}  chars {r['chars']}  "
              f"documents {r['documents']}  skipped {r['skipped']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)
    return 0


def _generate_mode(args) -> int:
    from megakor.generate import load_for_generation

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tokenizer, stops = load_for_generation(args.model, args.tokenizer, device)
        results = {}
        for name, path in parse_data(args.data).items():
            records, skipped = read_task_examples(path, args.max_docs)
            results[name] = {**evaluate_task(model, tokenizer, records, stops.eos_token_id, args.seq_len,
                                             args.max_new_tokens, args.num_beams, args.batch_size),
                             "skipped": sum(skipped.values()), "skipped_reasons": skipped}
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, r in results.items():
        print(f"{name or 'data'}: chrF {r['chrf']:.2f}  response loss {r['response_loss']:.4f} nats/token  "
              f"examples {r['examples']}  skipped {r['skipped']}")
        for s in r["samples"][:3]:
            print(f"  reference: {s['reference']}\n  output:    {s['output']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[""] if list(results) == [""] else results, f, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
