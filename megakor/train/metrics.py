"""Throughput figures: model FLOPs per token, TFLOP/s per device, MFU, memory.

Model FLOPs (PaLM, appendix B; what MFU is defined against, so recomputation from activation
checkpointing does not count):

    FLOPs per token = 6 · N + 12 · L · H · Q · T

N: parameters that take part in a matrix multiply for every token (every block weight and the LM
head; the input embedding is a table lookup); 6 = 2 (multiply-add) × 3 (forward, and backward for
inputs and weights). The second term is attention's QKᵀ and AV over a sequence of T tokens with L
layers, H query heads of size Q, counted as full attention the way PaLM and Megatron report it.
"""

from __future__ import annotations

import resource

import torch

from megakor.model.args import ModelArgs

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets (no sparsity). Matched as
# substrings of torch.cuda.get_device_name(), first match wins, so more specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]


def matmul_parameters(args: ModelArgs) -> int:
    """N: per-token matmul parameters (blocks + LM head, not the embedding lookup)."""
    norms = (2 * args.num_layers + 1) * args.hidden_size
    return args.num_parameters(include_embedding=False) - norms + args.vocab_size * args.hidden_size


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token, model FLOPs only, attention dense over seq_len."""
    return 6.0 * matmul_parameters(args) + 12.0 * args.num_layers * args.num_heads * args.head_dim * seq_len


def step_flops(args: ModelArgs, tokens: float, attention_square_sum: float) -> float:
    """Model FLOPs of a training step over `tokens` whose documents have lengths Lᵢ, with attention
    counted per document: 6·N·tokens + 12·L·H·Q·Σ Lᵢ² (Megatron-Bridge's count for packed batches; the
    dense-equivalent count, what an unpacked run of rows of T tokens would do, is Σ Lᵢ² = tokens·T)."""
    return 6.0 * matmul_parameters(args) * tokens + 12.0 * args.num_layers * args.num_heads * args.head_dim * \
        attention_square_sum


class StepTimer:
    """Where a step's time went: time/data (waiting for micro-batches, host clock), time/forward_backward
    (from the first forward to the end of the last backward) and time/optimizer (DeepSpeed's step) on
    the device's own timeline (CUDA events on the compute stream; host clock on CPU), and time/step (the
    wall time of the whole step, data included). Reading them synchronises with the device once, so
    `finish` is called only on steps that log. In the pipeline mode DeepSpeed runs the schedule and the
    optimizer step in one call: its time is all time/forward_backward, and time/optimizer is absent."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._t0 = self._data = 0.0
        self._marks: dict = {}

    def begin(self, sync: bool = False) -> None:
        """Start a step; `sync` (steps that will log) first waits for the device to finish earlier work."""
        import time

        if sync and self.cuda:
            torch.cuda.synchronize()
        self._t0, self._marks = time.perf_counter(), {}

    def data_done(self) -> None:
        import time

        self._data = time.perf_counter() - self._t0

    def mark(self, phase: str) -> None:
        """`phase` is "start", "forward_backward" or "optimizer": the moment that phase ends."""
        import time

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks[phase] = event
        else:
            self._marks[phase] = time.perf_counter()

    def finish(self) -> dict[str, float]:
        import time

        marks = [self._marks[k] for k in ("start", "forward_backward", "optimizer") if k in self._marks]
        if self.cuda:
            marks[-1].synchronize()
            phases = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        else:
            phases = [b - a for a, b in zip(marks, marks[1:])]
        out = {"time/data": self._data, "time/step": time.perf_counter() - self._t0,
               **dict(zip(("time/forward_backward", "time/optimizer"), phases))}
        return out


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak for `dtype`, or None when unknown (CPU, fp32, an unlisted GPU)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or the CPU resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def throughput(tokens: int, seconds: float, world_size: int, flops: float, dense_flops: float,
               peak_tflops: float | None) -> dict:
    """tokens/s for the whole job; model TFLOP/s per device and MFU (when the peak is known) with attention
    counted per document (`flops`), and the same with dense attention over each row (`dense_flops`,
    suffixed _dense_attention), as reports that ignore packing give it."""
    seconds = max(seconds, 1e-9)
    tflops = flops / seconds / world_size / 1e12
    dense = dense_flops / seconds / world_size / 1e12
    out = {"tokens_per_sec": tokens / seconds, "tflops_per_device": tflops, "tflops_per_device_dense_attention": dense}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
        out["mfu_dense_attention"] = dense / peak_tflops
    return out


class MetricsFile:
    """`metrics.jsonl` beside the TensorBoard event files: one JSON line per logged step (and one per
    evaluation), {"step": N, "time": unix seconds, "<tag>": value, ...}, every value in full precision (non-finite
    ones as null; `read_scalars` gives them back as NaN).

    Appended as the run goes (flushed per line, so a crash loses at most the line being written). On
    (re)start at `resume_step` the lines of later steps are dropped first, as TensorBoard's purge hides
    the events an interrupted run logged after its checkpoint; a torn last line is dropped too."""

    NAME = "metrics.jsonl"

    def __init__(self, directory, resume_step: int = 0):
        import json
        import os
        from pathlib import Path

        self.path = Path(directory) / self.NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                    kept.append(line + "\n")
            tmp = self.path.with_name(self.NAME + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, values: dict) -> None:
        import json
        import math
        import time

        # Non-finite values (a skipped step's loss) as null: NaN is not JSON that other readers accept.
        row = {"step": int(step), "time": time.time(),
               **{k: float(v) if math.isfinite(float(v)) else None for k, v in values.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_scalars(directory, tag: str | None = None) -> dict:
    """Exact scalars of a run from the `metrics.jsonl` under `directory` (its TensorBoard directory):
    {step: value} for one `tag`, or {tag: {step: value}} for all; a later line of a step wins."""
    import json
    from pathlib import Path

    out: dict[str, dict[int, float]] = {}
    path = Path(directory) / MetricsFile.NAME
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line a running (or killed) job is writing
            continue
        for k, v in row.items():
            if k not in ("step", "time"):
                out.setdefault(k, {})[row["step"]] = float("nan") if v is None else v
    return out.get(tag, {}) if tag is not None else out
