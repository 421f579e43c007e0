"""Extend a base tokenizer with Korean tokens and report fertility before and after.

    # Llama 3 + 8,000 Korean tokens learned on the offline Korean corpus (megakor.corpora)
    python launch/extend_tokenizer.py --base ../shared/fixtures/tokenizers/llama3 \\
        --new-tokens 8000 --out runs/tok-llama3-ko --report runs/tok-llama3-ko/fertility.json

    # your own corpus (JSONL with a "text" field, or plain text files)
    python launch/extend_tokenizer.py --base /models/Llama-2-7b-hf --corpus ko/*.jsonl \\
        --new-tokens 8000 --out runs/tok-llama2-ko

    # fertility only, of an extended tokenizer against its base
    python launch/extend_tokenizer.py --base /models/Llama-2-7b-hf --out runs/tok-llama2-ko --report-only

Evaluation text defaults to the held-out split of megakor.corpora (Korean) and Python's help topics
(English), which the default corpus never trains on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megakor import corpora  # noqa: E402
from megakor.tokenizer import extend, fertility  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base HF tokenizer directory or tokenizer.json")
    parser.add_argument("--corpus", nargs="+", help="Korean JSONL/text files to learn from "
                        "(default: the training split of megakor.corpora)")
    parser.add_argument("--new-tokens", type=int, default=8000, help="most new tokens to add")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="fewest corpus occurrences a new token needs")
    parser.add_argument("--out", required=True, help="output tokenizer directory (read with --report-only)")
    parser.add_argument("--report", help="write the fertility report here as JSON")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: compare the tokenizer in --out with --base")
    parser.add_argument("--eval-ko", nargs="+", help="held-out Korean JSONL/text files for the report")
    parser.add_argument("--eval-en", nargs="+", help="English JSONL/text files for the report")
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text")
    parser.add_argument("--cache", help="megakor.corpora cache directory (default $MEGAKOR_CACHE)")
    args = parser.parse_args(argv)

    default_files = None
    if not (args.corpus and args.eval_ko and args.eval_en):
        default_files = corpora.prepare_corpora(args.cache)
    if not args.report_only:
        texts = corpora.read_texts(args.corpus or [default_files["ko.train"]], args.text_field)
        ext = extend.extend_tokenizer(args.base, texts, args.new_tokens, args.out, args.min_frequency)
        print(f"{ext.kind}: added {len(ext.new_tokens)} tokens and {len(ext.merges)} merges, "
              f"ids {ext.base_size}..{ext.base_size + len(ext.new_tokens) - 1}; wrote {args.out}")
    ko = corpora.read_texts(args.eval_ko or [default_files["ko.heldout"]], args.text_field)
    en = corpora.read_texts(args.eval_en or [default_files["en.heldout"]], args.text_field)
    report = fertility.fertility_report(args.base, args.out, ko, en)
    print(fertility.format_report(report))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad paths, bad options, unreachable downloads
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
