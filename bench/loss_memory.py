"""LM-head + loss memory, and whole-model step time, against transformers' LlamaForCausalLM on CPU.

    python bench/loss_memory.py                 # the issue's sizes (needs ~20 GB free RAM, ~5 min)
    python bench/loss_memory.py --tokens 2048   # a smaller run

1. Peak memory of forward+backward of the LM head + loss at vocabulary 128,256, hidden 2048,
   8×1024 tokens: megakor's chunked vocab-parallel cross-entropy vs transformers' path
   (`lm_head` logits → `ForCausalLMLoss`). Peak resident memory is read from the kernel (VmHWM, reset
   between cases through /proc/self/clear_refs), above what the inputs and weights already hold.
2. Forward+backward step time of a ~50M-parameter model (preset llama-50m) vs LlamaForCausalLM
   (attention "sdpa") of the same config and weights, median of several steps.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_bytes(fn) -> int:
    """Peak RSS growth while running fn() (bytes above the RSS at the start)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - start) * 1024


def loss_memory(tokens: int, hidden_size: int, vocab: int, chunk: int):
    from transformers.loss.loss_utils import ForCausalLMLoss

    from megakor.model.layers import lm_head_cross_entropy

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).requires_grad_()
    hidden = torch.randn(1, tokens, hidden_size, generator=g).requires_grad_()
    input_ids = torch.randint(0, vocab, (1, tokens), generator=g)

    def hf_path():
        logits = F.linear(hidden, weight)  # LlamaForCausalLM: self.lm_head(hidden_states)
        loss = ForCausalLMLoss(logits, input_ids, vocab_size=vocab)
        loss.backward()
        return loss.item()

    def megakor_path():
        labels = torch.cat([input_ids[:, 1:], input_ids.new_full((1, 1), -100)], dim=1)  # pre-shifted
        loss = lm_head_cross_entropy(hidden.view(-1, hidden_size), weight, labels.view(-1), vocab, chunk,
                                     reduction="mean")
        loss.backward()
        return loss.item()

    results = {}
    for name, fn in (("megakor chunked", megakor_path), ("transformers", hf_path)):
        weight.grad = hidden.grad = None
        box = {}
        t0 = time.perf_counter()
        results[name] = (peak_bytes(lambda: box.setdefault("loss", fn())), time.perf_counter() - t0, box["loss"])
    return results


def step_time(steps: int, batch: int, seq: int):
    import transformers

    from megakor.checkpoint.hf import HFCheckpoint, load_into_model
    from megakor.model import Llama, preset
    from megakor.model.args import to_hf_config

    args = preset("llama-50m")
    cfg = transformers.LlamaConfig(**{k: v for k, v in to_hf_config(args).items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    ours = Llama(args)
    load_into_model(ours, HFCheckpoint.from_state_dict(to_hf_config(args), hf.state_dict()))
    n_params = sum(p.numel() for p in ours.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
    labels = torch.cat([ids[:, 1:], ids.new_full((batch, 1), -100)], dim=1)

    def hf_step():
        hf(input_ids=ids, labels=ids).loss.backward()

    def our_step():
        ours(ids, labels=labels).backward()

    times = {"megakor": [], "transformers": []}
    for i in range(steps + 1):  # the first round warms up both
        for name, fn, model in (("megakor", our_step, ours), ("transformers", hf_step, hf)):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    return n_params, {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8 * 1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--chunk", type=int, default=1024, help="megakor's loss chunk (tokens)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    print(f"LM head + loss, forward+backward: {a.tokens} tokens, hidden {a.hidden}, vocab {a.vocab}, fp32, CPU")
    mem = loss_memory(a.tokens, a.hidden, a.vocab, a.chunk)
    print(f"{'path':<18}{'peak memory (GiB)':>20}{'time (s)':>10}{'loss':>10}")
    for name, (peak, secs, loss) in mem.items():
        print(f"{name:<18}{peak / 2**30:>20.2f}{secs:>10.1f}{loss:>10.4f}")

    n, times = step_time(a.steps, a.batch, a.seq)
    print(f"\nforward+backward step, {n / 1e6:.1f}M parameters, batch {a.batch}×{a.seq}, fp32, "
          f"{torch.get_num_threads()} threads (median of {a.steps})")
    print(f"{'model':<18}{'step (s)':>10}{'tokens/s':>10}")
    for name, t in times.items():
        print(f"{name:<18}{t:>10.3f}{a.batch * a.seq / t:>10.0f}")
    print(f"\nstep time ratio megakor/transformers: {times['megakor'] / times['transformers']:.2f}x (target <= 1.0)")
    print(f"loss memory ratio megakor/transformers: "
          f"{mem['megakor chunked'][0] / mem['transformers'][0]:.2f}x (target <= 0.35)")


if __name__ == "__main__":
    main()
