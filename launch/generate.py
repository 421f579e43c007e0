"""Generate text from an HF or megakor checkpoint directory or a .gguf file (KV-cached).

    python launch/generate.py --model ~/.cache/megakor/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prompt "What is the capital of France?" --chat
    python launch/generate.py --model out/step_1000 --prompt "대한민국의 수도는" --num-beams 3
    python launch/generate.py --model out/step_1000 --prompt "옛날 옛적에" --top-p 0.9 --temperature 0.7 --seed 1

Greedy unless --top-p/--temperature (sampling) or --num-beams (beam search) say otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch

from megakor.generate import encode_prompt, generate, load_for_generation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF/megakor checkpoint directory or .gguf file")
    ap.add_argument("--prompt", required=True, help="text to continue (the user turn with --chat)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    ap.add_argument("--top-p", type=float, default=None, help="sample from this probability nucleus")
    ap.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    ap.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    ap.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob / length^this")
    ap.add_argument("--early-stopping", choices=["false", "true", "never"], default="false",
                    help="beam search stopping rule, as transformers defines it")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = ap.parse_args(argv)

    sample = args.top_p is not None or args.temperature is not None
    if sum([args.greedy, sample, args.num_beams > 1]) > 1:
        ap.error("choose one of --greedy, sampling (--top-p/--temperature) or --num-beams")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model, tokenizer, stops = load_for_generation(args.model, args.tokenizer, device, DTYPES[args.dtype])
        input_ids = encode_prompt(tokenizer, args.prompt, args.chat).to(device)
        output = generate(
            model, input_ids, args.max_new_tokens, stops.eos_token_id, stops.pad_token_id,
            do_sample=sample, temperature=args.temperature or 1.0, top_p=args.top_p or 1.0,
            num_beams=args.num_beams, length_penalty=args.length_penalty,
            early_stopping={"false": False, "true": True, "never": "never"}[args.early_stopping],
            generator=torch.Generator(device).manual_seed(args.seed) if sample else None,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
