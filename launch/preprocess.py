"""Tokenise raw corpora into an indexed memory-mapped dataset (P.bin, P.idx, P.json, P.skipped.log).

    python launch/preprocess.py --input data/ko/*.jsonl.zst data/wiki_ko/ --tokenizer ckpt/llama3-8b \
        --output-prefix cache/ko --workers 16 --report cache/ko.report.json
    python launch/preprocess.py --input en_replay.parquet --tokenizer ckpt/llama3-8b \
        --output-prefix cache/en --min-hangul-ratio 0
    python launch/preprocess.py --input raw.jsonl --tokenizer tok/ --output-prefix out/raw --no-clean

Re-running the same command after a crash redoes only the shards that had not finished.

Across nodes (a Slurm array job; slurm/preprocess.sh passes --slurm-array and submits --merge itself):
    sbatch --array=0-3 slurm/preprocess.sh --input data/ko/ --tokenizer ckpt/llama3-8b --output-prefix cache/ko
By hand, without Slurm: every task, then the merge, with the same options:
    python launch/preprocess.py --task-index 0 --num-tasks 2 --input ... --tokenizer ... --output-prefix P
    python launch/preprocess.py --task-index 1 --num-tasks 2 --input ... --tokenizer ... --output-prefix P
    python launch/preprocess.py --merge --input ... --tokenizer ... --output-prefix P
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megakor.data.clean import CleanConfig  # noqa: E402
from megakor.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megakor.data.sharded import array_task_from_env, merge, run_task  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (jsonl/json/parquet/txt, .gz/.zst, save_to_disk dirs)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or tokenizer.json")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json, PREFIX.skipped.log")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenising processes (0 = in this process)")
    p.add_argument("--no-clean", action="store_true", help="tokenise text as read: no cleaning, filters or dedup")
    p.add_argument("--report", help="also write the JSON report here")
    p.add_argument("--text-field", default="text", help="JSON key / column holding the text")
    p.add_argument("--text-unit", default="blank_line", choices=["blank_line", "line", "file"], help="plain text: what one document is")
    p.add_argument("--min-hangul-ratio", type=float, default=0.2, help="drop documents with less Hangul among letters (0 for English replay)")
    p.add_argument("--near-dup-threshold", type=float, default=0.8, help="MinHash Jaccard at or above which a document is a near duplicate")
    p.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    p.add_argument("--shard-bytes", type=int, help="input bytes per work unit (default: total / (4 x workers), 1-128 MB)")
    p.add_argument("--keep-shards", action="store_true", help="keep PREFIX.shards/ after merging")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    array = p.add_argument_group("array job (one task per node, then a global merge; writes PREFIX.tasks/)")
    array.add_argument("--task-index", type=int, help="run only this task's share of the input (0-based)")
    array.add_argument("--num-tasks", type=int, help="tasks the input is shared among (with --task-index)")
    array.add_argument("--slurm-array", action="store_true", help="task index and count from SLURM_ARRAY_TASK_ID/_MAX")
    array.add_argument("--merge", action="store_true", help="deduplicate the finished tasks globally and write "
                       "PREFIX.bin/.idx and PREFIX.report.json (or --report)")
    args = p.parse_args(argv)
    modes = sum([args.task_index is not None or args.slurm_array, args.merge])
    if modes > 1 or (args.task_index is not None and args.slurm_array):
        p.error("give one of --task-index, --slurm-array or --merge")
    if args.task_index is not None and args.num_tasks is None:
        p.error("--task-index needs --num-tasks (the number of tasks of the whole job)")
    if args.num_tasks is not None and args.num_tasks < 1:
        p.error(f"--num-tasks {args.num_tasks}: give at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = PreprocessOptions(
        text_field=args.text_field,
        text_unit=args.text_unit,
        clean=None if args.no_clean else CleanConfig(min_hangul_ratio=args.min_hangul_ratio),
        exact_dedup=not args.no_dedup,
        near_dedup=not args.no_dedup,
        near_dup_threshold=args.near_dup_threshold,
        shard_bytes=args.shard_bytes,
    )
    if args.merge:
        report = merge(args.input, args.tokenizer, args.output_prefix, options=options, report_path=args.report,
                       keep_shards=args.keep_shards)
    elif args.task_index is not None or args.slurm_array:
        index, count = (args.task_index, args.num_tasks) if args.task_index is not None else array_task_from_env(args.output_prefix)
        report = run_task(args.input, args.tokenizer, args.output_prefix, index, args.num_tasks or count,
                          workers=args.workers, options=options, progress=not args.quiet)
        if report.get("already_merged"):
            return report
        print(json.dumps({k: report[k] for k in ("task", "documents", "tokens", "skipped", "seconds", "tokens_per_sec")},
                         ensure_ascii=False))
        return report
    else:
        report = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers, options=options,
                            report_path=args.report, progress=not args.quiet, keep_shards=args.keep_shards)
    summary = {k: report[k] for k in ("documents", "tokens", "characters", "skipped", "seconds", "tokens_per_sec")}
    print(json.dumps(summary, ensure_ascii=False))
    return report


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad paths, bad options, unfinished tasks
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
