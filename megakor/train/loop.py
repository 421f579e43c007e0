"""The training loop: validate, join the job, build engine and data, resume, train, evaluate, log, save.

Loss normalisation (why every layout trains the same): a step's loss is

    Σ NLL over every labelled token of the global batch  /  number of labelled tokens in the global batch

Packed batches hold different numbers of labelled tokens per micro-batch, so averaging per-micro-batch
means (or per-rank means) would weight tokens differently under different layouts. Each step therefore
all-reduces the labelled-token count over data parallelism before any backward, and each micro-batch
back-propagates its summed NLL × (grad-accumulation × DP) / global tokens: DeepSpeed divides by the
accumulation steps and ZeRO averages gradients over DP, which leaves exactly d(step loss)/dθ. The
pipeline mode back-propagates the same scaled sum from its last stage (DeepSpeed's pipeline engine
divides by the accumulation steps and averages over DP alike), so every layout logs the same loss.

Faults (see `faults`): SIGUSR1/SIGTERM finish the step, save and return {"preempted": True}; a step with
a non-finite loss or gradient norm is skipped on every rank and counted in train/skipped_steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from megakor.config import Config, ConfigError, dump_config
from megakor.data.blend import Prefetcher, collate
from megakor.parallel import build_parallel_state, init_distributed, launch_world_size
from megakor.train import checkpointing, faults, metrics
from megakor.train.preflight import preflight, tokenizer_dir  # noqa: F401  (preflight: re-exported)
from megakor.train.schedule import lr_from_config

log = logging.getLogger("megakor.train")


# ---- data ----------------------------------------------------------------------------------------

def build_data(cfg: Config, ps):
    """(training micro-batch iterator for this DP rank, {name: eval PackedSource})."""
    from megakor.data.blend import BatchIterator, build_datasets

    try:
        train_set, eval_sets = build_datasets(cfg.data.sources, cfg.data.eval, tokenizer_dir(cfg), cfg.train.seq_len,
                                              cfg.train.seed, cfg.data.cache_dir, cfg.data.workers)
    except ValueError as e:  # duplicate names, hold-out larger than the source, mismatched EOS ids
        raise ConfigError(str(e)) from None
    return BatchIterator(train_set, cfg.train.micro_batch, cfg.train.global_batch, ps.dp_rank, ps.dp), eval_sets


@dataclasses.dataclass
class EvalSplit:
    name: str
    rows: np.ndarray  # [R, 3, T]: input_ids, position_ids, labels of packed evaluation chunks
    characters: int | None  # characters of the evaluated documents (None without a tokenizer)
    documents: int


def eval_split(name: str, source, seq_len: int, max_rows: int, bos_id: int | None, tokenizer) -> EvalSplit:
    """The evaluation protocol of `megakor.evaluate` applied to an eval split's documents: each document
    is [BOS] + its tokens, cut into chunks of at most seq_len, every token after a chunk's first is
    predicted; characters are those of the decoded documents. `max_rows` > 0 keeps only whole leading
    documents up to about that many packed rows."""
    from megakor.evaluate import pack_chunks

    docs, eos = source.docs, source.docs.eos_id
    start = bos_id if bos_id is not None else eos
    chunks, tokens, characters, n = [], 0, 0, 0
    for i in range(source.first_doc, source.last_doc):  # a held-out range, never the training documents
        if max_rows and n and tokens >= max_rows * seq_len:
            break
        ids = docs[i].tolist()
        if ids and ids[-1] == eos:
            ids = ids[:-1]
        s = [start] + ids
        chunks.extend(c for c in (s[j:j + seq_len] for j in range(0, len(s), seq_len)) if len(c) > 1)
        tokens += len(s)
        if tokenizer is not None:
            characters += len(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        n += 1
    rows = np.asarray(pack_chunks(chunks, seq_len), dtype=np.int64).reshape(-1, 3, seq_len)
    return EvalSplit(name, rows, characters if tokenizer is not None else None, n)


def task_eval_split(name: str, source, max_rows: int) -> EvalSplit:
    """A task (format: chat) eval source as packed rows of whole examples whose labels are the responses
    only: eval/<name>_loss is the response-only loss."""
    from megakor.data.examples import eval_rows

    rows = eval_rows(source, max_rows)
    return EvalSplit(name, rows, None, int(source.row_start[len(rows)]))


@torch.no_grad()
def evaluate(engine, splits: list[EvalSplit], ps, micro_batch: int, device) -> dict:
    """eval/<name>_loss, eval/<name>_bits_per_char and eval/loss over all DP ranks (bits per character
    where the split's characters are known: on rank 0, which decodes the documents)."""
    engine.eval()
    out, total_nll, total_tokens = {}, 0.0, 0
    for split in splits:
        mine = split.rows[ps.dp_rank::ps.dp]
        # Every DP rank runs the same number of forwards: ZeRO-3 gathers parameters collectively.
        n_batches = math.ceil(math.ceil(len(split.rows) / ps.dp) / micro_batch)
        acc = torch.zeros(2, dtype=torch.float64, device=device)
        pipeline_batches = []
        for b in range(n_batches):
            rows = mine[b * micro_batch:(b + 1) * micro_batch]
            if len(rows) == 0 or (ps.pp > 1 and len(rows) < micro_batch):
                # This rank ran out: dummy rows that predict nothing (pipeline stages exchange activations
                # of one fixed shape, so there every micro-batch is filled up).
                n_dummy = micro_batch - len(rows) if ps.pp > 1 else 1
                dummy = np.zeros((n_dummy, 3, split.rows.shape[-1]), dtype=np.int64)
                dummy[:, 1] = np.arange(dummy.shape[-1])  # one document per row: SDPA's plain causal path
                dummy[:, 2] = -100
                rows = np.concatenate([rows, dummy]) if len(rows) else dummy
            host = collate([{"input_ids": torch.from_numpy(r[0]), "position_ids": torch.from_numpy(r[1]),
                              "labels": torch.from_numpy(r[2])} for r in rows])
            b = to_device(host, device)
            if ps.pp > 1:
                pipeline_batches.append((b["input_ids"], b["position_ids"], b["cu_seqlens"], b["labels"]))
            else:
                nll = engine(b["input_ids"], b["position_ids"], b["labels"], reduction="sum",
                             cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"])
                acc[0] += nll.double()
            acc[1] += int((host["labels"] != -100).sum())
        if pipeline_batches:
            from megakor.model.pipeline import run_pipeline

            acc[0] += run_pipeline(engine, pipeline_batches, ps, loss_scale=None)
        dist.all_reduce(acc, group=ps.dp_group)
        nll, tokens = float(acc[0]), int(acc[1])
        out[f"eval/{split.name}_loss"] = nll / max(tokens, 1)
        if split.characters:
            out[f"eval/{split.name}_bits_per_char"] = nll / math.log(2) / split.characters
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    out["eval/loss"] = total_nll / max(total_tokens, 1)
    engine.train()
    return out


# ---- logging -------------------------------------------------------------------------------------

class Logger:
    """Console lines, TensorBoard scalars and the metrics file, rank 0 only.

    TensorBoard gets float32 scalars: its default (Rust) loader drops float64 ones, so double-precision
    scalars would show no curve at all. Exact values go to `metrics.jsonl` beside the event files (see
    `metrics.MetricsFile`), which is what tests and comparisons read. A resumed run hides what the
    interrupted one logged after its checkpoint, in both."""

    def __init__(self, cfg: Config, rank: int, start_step: int = 0):
        self.rank, self.writer, self.file = rank, None, None
        if rank == 0 and cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.file = metrics.MetricsFile(cfg.logging.tensorboard_dir, resume_step=start_step)
            self.writer = SummaryWriter(cfg.logging.tensorboard_dir, purge_step=start_step + 1)
            text = dump_config(cfg)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)  # a plain float32 simple_value
            self.writer.flush()
            self.file.write(step, values)

    def info(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.close()


# ---- the loop ------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class StepResult(NamedTuple):
    loss: float
    skipped: bool  # non-finite loss or gradient norm: no update on any rank
    stop: bool  # some rank received SIGUSR1/SIGTERM: save and exit after this step
    attention_square_sum: float  # Σ Lᵢ² over the documents of the global batch (per-document attention FLOPs)


def to_device(batch: dict, device) -> dict:
    """A micro-batch's tensors on `device`: non-blocking from pinned memory on CUDA."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def document_square_sum(batch: dict) -> int:
    """Σ Lᵢ² of a micro-batch's packed documents, from its host-side cu_seqlens."""
    lengths = batch["cu_seqlens"].diff().long()
    return int((lengths * lengths).sum())


def teacher_inputs(teacher, host: dict, device, batch: dict | None = None) -> tuple | None:
    """For a micro-batch with distilled rows: (their row indices, the other rows' indices, the teacher's
    final hidden states of the distilled rows, the teacher's head) for the model's forward; None without
    such rows. `host` is the batch on the host (its `distill` flags decide, read there: no device sync),
    `batch` the same batch on `device` (default: `host`). Only the distilled rows go through the teacher;
    the small index tensors reach the device from pinned memory without blocking."""
    if teacher is None or "distill" not in host or not bool(host["distill"].any()):
        return None
    from megakor.model.attention import cu_seqlens_from_positions

    batch = host if batch is None else batch
    flags = host["distill"].bool()
    rows, others = flags.nonzero().flatten(), (~flags).nonzero().flatten()
    cu_seqlens, max_seqlen = cu_seqlens_from_positions(host["position_ids"].index_select(0, rows))

    def send(t: torch.Tensor) -> torch.Tensor:
        if torch.device(device).type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)

    rows_d, others_d = send(rows), send(others)
    with torch.no_grad():
        hidden = teacher.hidden_states(batch["input_ids"].index_select(0, rows_d),
                                       batch["position_ids"].index_select(0, rows_d),
                                       cu_seqlens=send(cu_seqlens), max_seqlen=max_seqlen)
    return rows_d, others_d, hidden, teacher.head_weight


def train_step(engine, micro_batches: list[dict], ps, device, stop_requested=lambda: False,
               inject_nan: bool = False, timer: metrics.StepTimer | None = None, teacher=None) -> StepResult:
    """One optimizer step over this rank's micro-batches (module docstring). Between the last forward and
    its backward all ranks agree whether to skip the step and whether to stop after it (`faults`); that
    agreement is the step's one device→host read. Micro-batches arrive on the host (pinned on CUDA).
    With a `teacher` (sources with distill: true), their rows' tokens are scored by KL(teacher ‖ model)
    instead of cross-entropy; they count as labelled tokens like any other."""
    # Token counts and document lengths come from the host copies: no device sync.
    labelled = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    square_sum = sum(document_square_sum(b) for b in micro_batches)
    if ps.dp > 1:  # collectives on `device`: NCCL reduces only GPU tensors; read back with the agreement
        counts = torch.tensor([float(labelled), float(square_sum)], dtype=torch.float64, device=device)
        dist.all_reduce(counts, group=ps.dp_group)
        global_tokens = counts[0].clamp_min(1.0)
        scale = (len(micro_batches) * ps.dp / global_tokens).float()  # undoes DeepSpeed's 1/gas and ZeRO's DP average
    else:
        counts = None
        global_tokens = float(max(labelled, 1))
        scale = len(micro_batches) / global_tokens
    if timer is not None:
        timer.mark("start")
    if ps.pp > 1:  # the last stage's loss function back-propagates NLL × scale (megakor.model.pipeline)
        from megakor.model.pipeline import run_pipeline

        on_device = [to_device(b, device) for b in micro_batches]
        loss_sum = run_pipeline(engine, [(b["input_ids"], b["position_ids"], b["cu_seqlens"], b["labels"])
                                         for b in on_device], ps, scale)
        dist.all_reduce(loss_sum, group=ps.dp_group)
        # The step is taken: only DeepSpeed can skip it.
        _, stop, values = faults.agree(True, stop_requested(), device, _read(loss_sum, counts))
        if timer is not None:  # DeepSpeed's pipeline runs the schedule and the optimizer step in one call
            timer.mark("forward_backward")
        tokens, squares = (values[1], values[2]) if counts is not None else (global_tokens, square_sum)
        return StepResult(values[0] / max(tokens, 1.0), not engine.was_step_applied(), stop, squares)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = stop = False
    values = []
    for i, host in enumerate(micro_batches):
        b = to_device(host, device)
        extra = {}
        distill = teacher_inputs(teacher, host, device, b)
        if distill is not None:
            extra["teacher"] = distill
        nll = engine(b["input_ids"], b["position_ids"], b["labels"], reduction="sum", cu_seqlens=b["cu_seqlens"],
                     max_seqlen=b["max_seqlen"], **extra)
        if inject_nan and i == 0:
            nll = nll * float("nan")
        loss_sum += nll.detach().double()
        if i == len(micro_batches) - 1:
            dist.all_reduce(loss_sum, group=ps.dp_group)
            nonfinite, stop, values = faults.agree(torch.isfinite(loss_sum), stop_requested(), device,
                                                   _read(loss_sum, counts))
            if nonfinite:  # NaN gradients on every rank: DeepSpeed's overflow path discards the step everywhere
                nll = nll * float("nan")
        engine.backward(nll * scale)
        if i == len(micro_batches) - 1 and timer is not None:
            timer.mark("forward_backward")
        engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
    if timer is not None:
        timer.mark("optimizer")
    if nonfinite and engine.was_step_applied():
        raise faults.NumericalFault("a non-finite step was applied: DeepSpeed discards those only under ZeRO, so the "
                                    "weights are lost and the run stops without saving; resume from the last "
                                    "checkpoint with parallel.zero_stage 1, 2 or 3")
    tokens, squares = (values[1], values[2]) if counts is not None else (global_tokens, square_sum)
    return StepResult(values[0] / max(tokens, 1.0), nonfinite or not engine.was_step_applied(), stop, squares)


def _read(loss_sum: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
    return loss_sum.reshape(1) if counts is None else torch.cat([loss_sum.reshape(1), counts])


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured; returns {"step", "losses": {step: loss}, "eval": {...},
    "preempted": stopped early by SIGUSR1/SIGTERM, after saving}. Raises faults.NumericalFault after
    train.max_skipped_steps consecutive non-finite steps."""
    args = preflight(cfg, launch_world_size())
    with faults.StopSignals() as stop:
        return _train(cfg, args, stop)


def _train(cfg: Config, args, stop: faults.StopSignals) -> dict:
    from megakor.tokenizer import load_tokenizer
    from megakor.config import distilled_sources
    from megakor.train.engine import build_engine, build_teacher

    rank, world_size, device = init_distributed(timeout_seconds=cfg.parallel.timeout_seconds)
    ps = build_parallel_state(cfg.parallel.tensor, cfg.parallel.pipeline)
    seed_everything(cfg.train.seed)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"megakor: {world_size} processes, tp={ps.tp} dp={ps.dp} pp={ps.pp}, ZeRO-{cfg.parallel.zero_stage}, model "
        f"{cfg.model.init_from} ({args.num_parameters() / 1e6:.1f}M parameters), device {device.type}", flush=True)

    engine, _, dtype = build_engine(cfg, ps, device)
    teacher = build_teacher(cfg, ps, dtype, device)
    if teacher is not None:
        say(f"megakor: sources {distilled_sources(cfg)} are scored against the starting model (KL, distill: true)",
            flush=True)
    if ps.pp > 1:
        say(f"megakor: pipeline stages ({cfg.parallel.pipeline_partition}): {engine.module.describe_stages()}",
            flush=True)
    batches, eval_sources = build_data(cfg, ps)
    tok_dir = tokenizer_dir(cfg)
    tokenizer = load_tokenizer(tok_dir) if tok_dir and eval_sources else None
    # evaluate.py's start token: the tokenizer's BOS, else its EOS (the same on every rank: rows must agree).
    bos = args.bos_token_id if tokenizer is None else tokenizer.bos_token_id
    bos = bos if bos is not None else (tokenizer.eos_token_id if tokenizer is not None else None)
    # The same documents whatever the layout, so eval figures compare across runs.
    max_rows = cfg.train.eval_batches * cfg.train.micro_batch
    splits = [task_eval_split(name, src, max_rows) if getattr(src, "is_task_data", False) else
              eval_split(name, src, cfg.train.seq_len, max_rows, bos, tokenizer if rank == 0 else None)
              for name, src in eval_sources.items()]

    step, state = 0, {"consumed_samples": 0, "consumed_tokens": 0, "data": batches.state_dict()}
    tag, skipped = checkpointing.resume_point(cfg.checkpoint.dir, world_size, ps.tp, ps.pp)
    for reason in skipped if rank == 0 else []:
        log.warning("megakor: WARNING: skipping checkpoint %s", reason)
    if tag is not None:
        state = checkpointing.load_checkpoint(engine, cfg.checkpoint.dir, tag)
        step = state["step"]
        batches.load_state_dict(state["data"])
        say(f"megakor: resumed from {Path(cfg.checkpoint.dir) / tag} at step {step}", flush=True)
    out = Logger(cfg, rank, step)
    hf_config = _base_hf_config(cfg, args)
    peak = metrics.device_peak_tflops(device, dtype)
    step_tokens = cfg.train.global_batch * cfg.train.seq_len
    losses = {}
    skips = faults.SkippedSteps(cfg.train.max_skipped_steps, state.get("skipped_steps", 0),
                                state.get("consecutive_skipped_steps", 0))
    gas = engine.gradient_accumulation_steps()
    feed = Prefetcher(batches, depth=2 * gas, pin_memory=device.type == "cuda")  # two steps ahead

    def save(at: int):
        checkpointing.save_checkpoint(engine, ps, cfg.checkpoint.dir, at, {**state, "config": cfg.to_dict()},
                                      cfg.checkpoint.keep, args, hf_config, tok_dir)
        out.info(f"megakor: saved checkpoint {Path(cfg.checkpoint.dir) / checkpointing.tag_for(at)}")

    timer = metrics.StepTimer(device)
    last_eval, last_saved = {}, step
    try:
        while step < cfg.train.steps:
            faults.send_usr1_at(step + 1, rank, world_size)  # test hook (faults)
            # A logging step starts from an idle device, so its time is its own and not the tail of the last.
            timer.begin(sync=(step + 1) % cfg.logging.log_every == 0 or step + 1 == cfg.train.steps)
            lr = lr_from_config(cfg, step + 1)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [next(feed) for _ in range(gas)]
            timer.data_done()
            with profiled(cfg, step + 1, rank, device):
                result = train_step(engine, micro_batches, ps, device, lambda: stop.received is not None,
                                    faults.inject_nan(step + 1, rank), timer, teacher)
            step += 1
            loss = losses[step] = result.loss
            skips.record(result.skipped)
            state.update(consumed_samples=batches.consumed_samples, data=batches.state_dict(),
                         consumed_tokens=state["consumed_tokens"] + step_tokens, skipped_steps=skips.total,
                         consecutive_skipped_steps=skips.consecutive)
            if step % cfg.logging.log_every == 0 or step == cfg.train.steps or result.skipped:
                times = timer.finish()  # the device's queue drains here, on logging steps only
                grad_norm = None if result.skipped else engine.get_global_grad_norm()  # before clipping
                flops = metrics.step_flops(args, step_tokens, result.attention_square_sum)
                dense = metrics.step_flops(args, step_tokens, step_tokens * cfg.train.seq_len)
                perf = metrics.throughput(step_tokens, times["time/step"], world_size, flops, dense, peak)
                values = {"train/loss": loss, "train/lr": lr, **{f"train/{k}": v for k, v in perf.items()},
                          "train/memory_gb": metrics.memory_gb(device), "train/skipped_steps": skips.total, **times}
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                out.scalars(values, step)
                out.info(f"step {step}/{cfg.train.steps} | loss {loss:.4f} | lr {lr:.3e} | grad_norm "
                         f"{float(grad_norm or 0):.3f} | {perf['tokens_per_sec']:.0f} tok/s | {perf['tflops_per_device']:.3f} "
                         "TFLOP/s/device"
                         + (f" | MFU {perf['mfu']:.1%} ({perf['mfu_dense_attention']:.1%} dense-attention)"
                            if "mfu" in perf else "") + f" | {values['train/memory_gb']:.2f} GB"
                         + f" | step {times['time/step']:.3f}s = data {times['time/data']:.3f} + fwd/bwd "
                           f"{times['time/forward_backward']:.3f}"
                         + (f" + optim {times['time/optimizer']:.3f}" if "time/optimizer" in times else "")
                         + (f" | SKIPPED (non-finite), {skips.consecutive} in a row" if result.skipped else ""))
            skips.check(step, str(Path(cfg.checkpoint.dir) / checkpointing.tag_for(last_saved)) if last_saved else None)
            if splits and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps):
                last_eval = evaluate(engine, splits, ps, cfg.train.micro_batch, device)
                if cfg.train.eval_generate and tokenizer is not None:  # chrF of greedy answers (generation_eval)
                    from megakor.train.generation_eval import generation_eval

                    tasks = {n: s for n, s in eval_sources.items() if getattr(s, "is_task_data", False)}
                    last_eval.update(generation_eval(engine, args, tasks, tokenizer, cfg.train.eval_generate,
                                                     cfg.train.eval_max_new_tokens, rank, device))
                out.scalars(last_eval, step)
                out.info(f"eval {step} | " + " | ".join(f"{k[5:]} {v:.4f}" for k, v in last_eval.items()))
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                save(step)
                last_saved = step
            if result.stop and step < cfg.train.steps:
                out.info(f"megakor: stop requested (SIGUSR1/SIGTERM) at step {step}: saving, then exiting for requeue")
                break
    finally:
        feed.close()
    if last_saved != step and (cfg.checkpoint.save_at_end or step < cfg.train.steps):
        save(step)
    out.close()
    dist.barrier()
    return {"step": step, "losses": losses, "eval": last_eval, "preempted": step < cfg.train.steps}


@contextlib.contextmanager
def profiled(cfg: Config, step: int, rank: int, device):
    """torch.profiler around optimizer step `logging.profile_step`; rank 0 writes the operator tables."""
    if step != cfg.logging.profile_step or rank != 0 or not cfg.logging.tensorboard_dir:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield
    if device.type == "cuda":
        torch.cuda.synchronize()
    table = prof.key_averages()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    text = (f"== step {step}, by {sort}\n" + table.table(sort_by=sort, row_limit=30, max_name_column_width=60)
            + "\n== by self_cpu_time_total\n" + table.table(sort_by="self_cpu_time_total", row_limit=30,
                                                            max_name_column_width=60))
    path = Path(cfg.logging.tensorboard_dir) / f"profile_step{step}.txt"
    path.write_text(text)
    print(f"megakor: profile of step {step} written to {path}", flush=True)


def _base_hf_config(cfg: Config, args) -> dict:
    """The config.json an export starts from: the source checkpoint's (fields we do not own kept)."""
    from megakor.model.args import to_hf_config
    from megakor.checkpoint.source import resolve_model_source

    source = resolve_model_source(cfg.model.init_from)
    return source.hf_config() if source.kind in ("hf", "training") else to_hf_config(args)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    # DeepSpeed 0.19's ZeRO-3 (and its pipeline's TP-partitioned activations) call torch collectives that
    # torch 2.13 deprecates.
    warnings.filterwarnings("ignore", message=".*(reduce_scatter_tensor|all_gather_into_tensor).*",
                            category=FutureWarning)
