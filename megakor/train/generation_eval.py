"""Generation-mode evaluation inside the trainer (train.eval_generate > 0): at each evaluation the first N
examples of every task eval source (format: chat) are answered greedily and scored with chrF against their
references, logged as eval/<name>_chrf.

The prompt and reference come from the stored example itself: its last run of trained tokens (the loss
mask) is the last assistant turn; everything before it is the prompt, the turn without its end-of-turn
token is the reference, and generation stops at EOS or at that end-of-turn token.

Under ZeRO-3 every rank holds a shard of each weight, and decoding thousands of one-token steps through
ZeRO's gather hooks would all-gather the model once per token on every rank. Instead the weights are
gathered once (every rank takes part), rank 0 copies them into a plain model and decodes alone, and the
others wait at a barrier. Data × tensor parallelism with TP = 1 and no pipeline only (checked by the
config); the copy needs one full model's memory on rank 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def task_prompts(source, n: int) -> list[tuple[list[int], list[int], int]]:
    """(prompt ids, reference ids, end-of-turn id) of the first `n` examples of an eval task source."""
    out = []
    for doc, length in zip(source.examples[:n], source.lengths[:n]):
        ids = np.asarray(source.docs.get(int(doc), 0, int(length)), dtype=np.int64)
        mask = np.asarray(source._mask(int(doc), int(length)))
        trained = np.flatnonzero(mask)
        if not len(trained):
            continue  # truncated before its answer
        end = int(trained[-1]) + 1
        start = end - 1
        while start > 0 and mask[start - 1]:
            start -= 1
        out.append((ids[:start].tolist(), ids[start:end - 1].tolist(), int(ids[end - 1])))
    return out


def generation_eval(engine, args, sources: dict, tokenizer, n: int, max_new_tokens: int, rank: int, device) -> dict:
    """{"eval/<name>_chrf": ...} on rank 0 (empty elsewhere); every rank must call it."""
    import deepspeed

    from megakor.evaluate import chrf
    from megakor.generate import generate
    from megakor.model import Llama
    from megakor.model.attention import rope_inv_freq

    state = None
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if rank == 0:
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    out = {}
    if rank == 0:
        with torch.device("meta"):
            model = Llama(args)
        model.load_state_dict(state, assign=True)
        model.rope.inv_freq = rope_inv_freq(args).to(device)
        model.eval()
        for name, source in sources.items():
            refs, hyps = [], []
            for prompt, reference, end_of_turn in task_prompts(source, n):
                ids = torch.tensor([prompt], device=device)
                with torch.no_grad():
                    gen = generate(model, ids, max_new_tokens, [tokenizer.eos_token_id, end_of_turn])
                hyps.append(tokenizer.decode(gen[0, len(prompt):], skip_special_tokens=True).strip())
                refs.append(tokenizer.decode(reference, skip_special_tokens=True).strip())
            if refs:
                out[f"eval/{name}_chrf"] = chrf(hyps, refs)
        del model, state
    dist.barrier()
    return out
