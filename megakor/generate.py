"""KV-cached text generation with the megakor `Llama`: greedy, top-p sampling and beam search.

    model, tokenizer, stop = load_for_generation("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = encode_prompt(tokenizer, "What is the capital of France?", chat=True)
    out = generate(model, ids, 32, stop.eos_token_id, stop.pad_token_id, num_beams=3)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

Every decoding rule is transformers' `generate` (v5), so the two agree token for token on the same
weights: greedy and sampling stop a row at its first EOS and pad it afterwards; beam search keeps
2·num_beams candidates per step (more with several EOS ids), scores a finished hypothesis by its
summed log-probability over (generated length)^length_penalty, and stops by transformers' early-stopping
heuristic (`early_stopping` False, True or "never"). Prompts in a batch must share one length (no padding).

The cache is preallocated for prompt + max_new_tokens. New tokens take the positions after the cached
ones, so every RoPE variant continues correctly; dynamic-NTK RoPE recomputes its frequencies from the
longest position at each step while cached keys keep the rotation they were written with, exactly as
transformers' cached generation does (a full forward would re-rotate them, so past
max_position_embeddings the two differ by design).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

NEG_INF_SCORE = -1.0e9  # transformers' "never choose this beam" score; kept identical so ties break alike


# ---- KV cache -------------------------------------------------------------------------------------

class LayerKVCache:
    """Keys and values of one attention layer, [batch, max_len, kv_heads, head_dim] each."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        self.keys = torch.empty(batch, max_len, kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0  # tokens cached so far

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Append k, v [B, T, kv_heads, D]; return every key and value so far and the past length."""
        past, end = self.length, self.length + k.shape[1]
        if end > self.keys.shape[1]:
            raise ValueError(f"KV cache holds {self.keys.shape[1]} tokens and {end} were asked for; "
                             "allocate it for prompt + max_new_tokens")
        self.keys[:, past:end] = k
        self.values[:, past:end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end], past


class KVCache:
    """One `LayerKVCache` per decoder layer, keyed like `Llama.layers` ("0".."N-1")."""

    def __init__(self, model, batch: int, max_len: int):
        weight = model.tok_embeddings.weight
        self.layers = {name: LayerKVCache(batch, max_len, block.attention.local_kv_heads, block.attention.head_dim,
                                          weight.dtype, weight.device)
                       for name, block in model.layers.items()}

    def __getitem__(self, name: str) -> LayerKVCache:
        return self.layers[name]

    @property
    def length(self) -> int:
        return next(iter(self.layers.values())).length

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row i hold what row rows[i] held (beam search keeps some beams and drops others)."""
        for layer in self.layers.values():
            n = layer.length
            layer.keys[:, :n] = layer.keys[rows, :n]
            layer.values[:, :n] = layer.values[rows, :n]

    def repeat_rows(self, times: int) -> "KVCache":
        """Each row `times` times in a row (the prompt's cache copied into every beam)."""
        for layer in self.layers.values():
            layer.keys = layer.keys.repeat_interleave(times, dim=0)
            layer.values = layer.values.repeat_interleave(times, dim=0)
        return self


def next_token_logits(model, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, V] for the token after `tokens` [B, T], which continue the cached ones."""
    past = cache.length
    B, T = tokens.shape
    positions = torch.arange(past, past + T, device=tokens.device).unsqueeze(0).expand(B, T)
    hidden = model.hidden_states(tokens, positions, kv_cache=cache)
    return model.logits(hidden[:, -1:])[:, 0].float()


# ---- decoding rules -------------------------------------------------------------------------------

def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the nucleus: the smallest set of most likely tokens whose
    probability reaches top_p (transformers' TopPLogitsWarper; the most likely token always stays)."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is not in (0, 1]; use e.g. 0.9, or 1.0 for no filtering")
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def repetition_penalty_filter(logits: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of every token already in the row
    (prompt included) is divided by `penalty` if positive, multiplied if negative."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty={penalty} must be positive; 1.0 means no penalty")
    seen = torch.gather(logits, 1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, sequences, seen)


def no_repeat_ngram_filter(logits: torch.Tensor, sequences: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' NoRepeatNGramLogitsProcessor: a token that would complete an n-gram already present
    in the row (prompt included) gets -inf."""
    if n <= 0:
        raise ValueError(f"no_repeat_ngram_size={n} must be positive; 0 means no constraint")
    length = sequences.shape[1]
    if length + 1 < n:
        return logits
    logits = logits.clone()
    for row, seq in enumerate(sequences.tolist()):
        prefix = seq[length - n + 1:]
        banned = [seq[i + n - 1] for i in range(length - n + 1) if seq[i:i + n - 1] == prefix]
        if banned:
            logits[row, banned] = float("-inf")
    return logits


def _eos_tensor(eos_token_id, device) -> torch.Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, generator: torch.Generator | None = None,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> torch.Tensor:
    """Prompt plus generated token ids, [B, prompt + generated], as transformers' `generate` returns them.

    input_ids: [B, T] prompts of one length. eos_token_id: one id or several; a row stops at the first.
    pad_token_id fills rows that stopped early (default: the first EOS id). do_sample draws from
    softmax(logits / temperature) restricted to the top_p nucleus, with `generator` for reproducibility;
    num_beams > 1 runs beam search (deterministic; beam sampling is not supported).
    repetition_penalty (> 1 discourages tokens already in the row) and no_repeat_ngram_size (> 0 forbids
    repeating an n-gram) act as transformers' processors of the same names, before temperature and top-p.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_len] with a non-empty prompt, got {tuple(input_ids.shape)}")
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be at least 1")
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling is not supported; use num_beams=1 with do_sample, or num_beams>1 without")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive; use do_sample=False for greedy decoding")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r} must be True, False or 'never'")
    if num_beams > 1 and (repetition_penalty != 1.0 or no_repeat_ngram_size):
        raise ValueError("repetition_penalty and no_repeat_ngram_size are supported with num_beams=1 only")
    if max_new_tokens <= 0:
        return input_ids.clone()
    eos = _eos_tensor(eos_token_id, input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    was_training = model.training
    model.eval()  # activation checkpointing (a training-mode path) would bypass the cache
    try:
        if num_beams == 1:
            return _sample(model, input_ids, max_new_tokens, eos, pad_token_id, do_sample, temperature, top_p,
                           generator, repetition_penalty, no_repeat_ngram_size)
        return _beam_search(model, input_ids, max_new_tokens, eos, pad_token_id, num_beams, length_penalty,
                            early_stopping)
    finally:
        model.train(was_training)


def _sample(model, input_ids, max_new_tokens, eos, pad_token_id, do_sample, temperature, top_p, generator,
            repetition_penalty=1.0, no_repeat_ngram_size=0):
    """Greedy (argmax) or multinomial sampling, one token per row per step."""
    B, prompt_len = input_ids.shape
    cache = KVCache(model, B, prompt_len + max_new_tokens)
    sequences = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    logits = next_token_logits(model, cache, input_ids)
    for step in range(max_new_tokens):
        if step:
            logits = next_token_logits(model, cache, sequences[:, -1:])
        if repetition_penalty != 1.0:
            logits = repetition_penalty_filter(logits, sequences, repetition_penalty)
        if no_repeat_ngram_size:
            logits = no_repeat_ngram_filter(logits, sequences, no_repeat_ngram_size)
        if do_sample:
            scores = logits / temperature if temperature != 1.0 else logits
            if top_p < 1.0:
                scores = top_p_filter(scores, top_p)
            tokens = torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
        else:
            tokens = logits.argmax(dim=-1)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        unfinished &= ~torch.isin(tokens, eos)
        if not unfinished.any():
            break
    return sequences


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor [B, K, ...] → [B, k, ...] along dim 1 at indices [B, k]."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def _beam_search(model, input_ids, max_new_tokens, eos, pad_token_id, num_beams, length_penalty, early_stopping):
    """transformers' vectorised beam search (`GenerationMixin._beam_search`), with the same score
    arithmetic, so hypotheses rank and tie alike. Per batch item: `running` beams still growing and
    the `finished` hypotheses kept so far, num_beams of each."""
    B, prompt_len = input_ids.shape
    max_len = prompt_len + max_new_tokens
    device = input_ids.device
    # Keep enough candidates that num_beams stay alive even if the best ones all end in an EOS.
    candidates = max(2, 1 + len(eos)) * num_beams
    in_top_beams = torch.arange(candidates, device=device) < num_beams

    running = torch.full((B, num_beams, max_len), pad_token_id, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = input_ids[:, None, :]
    finished = running.clone()
    # Only the first beam is live at the start, so the beams do not all pick the same first token.
    running_scores = torch.zeros(B, num_beams, device=device)
    running_scores[:, 1:] = NEG_INF_SCORE
    finished_scores = torch.full((B, num_beams), NEG_INF_SCORE, device=device)
    finished_lengths = torch.zeros(B, num_beams, dtype=torch.long, device=device)  # generated tokens
    is_finished = torch.zeros(B, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * num_beams

    cache = KVCache(model, B, max_len)
    logits = next_token_logits(model, cache, input_ids).repeat_interleave(num_beams, dim=0)
    cache.repeat_rows(num_beams)
    cur_len = prompt_len
    while True:
        vocab = logits.shape[-1]
        log_probs = torch.log_softmax(logits, dim=-1).view(B, num_beams, vocab) + running_scores[:, :, None]
        top_scores, top_index = torch.topk(log_probs.reshape(B, -1), k=candidates)
        source_beam, token = top_index // vocab, top_index % vocab
        extended = _gather_beams(running, source_beam)
        extended[:, :, cur_len] = token
        hits_stop = torch.isin(token, eos) | (cur_len + 1 >= max_len)

        # Beams that continue: the best candidates that did not just stop.
        alive_scores = top_scores + hits_stop.to(torch.float32) * NEG_INF_SCORE
        keep = torch.topk(alive_scores, k=num_beams)[1]
        running = _gather_beams(extended, keep)
        running_scores = _gather_beams(alive_scores, keep)
        kept_source = _gather_beams(source_beam, keep)

        # Hypotheses that end here, length-penalised, compete with those finished before; only the
        # top num_beams candidates may finish, and none once a batch item can no longer improve.
        end_scores = top_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
        batch_full = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        end_scores += batch_full.to(torch.float32) * NEG_INF_SCORE
        end_scores += (~can_improve).to(torch.float32) * NEG_INF_SCORE
        just_finished = hits_stop & in_top_beams[None, :]
        end_scores += (~just_finished) * NEG_INF_SCORE
        merged_scores = torch.cat((finished_scores, end_scores), dim=1)
        best = torch.topk(merged_scores, k=num_beams)[1]
        finished = _gather_beams(torch.cat((finished, extended), dim=1), best)
        finished_scores = _gather_beams(merged_scores, best)
        new_lengths = torch.full_like(token, cur_len + 1 - prompt_len)
        finished_lengths = _gather_beams(torch.cat((finished_lengths, new_lengths), dim=1), best)
        is_finished = _gather_beams(torch.cat((is_finished, just_finished), dim=1), best)

        cur_len += 1
        # Could a running beam still beat the worst kept hypothesis? With early_stopping="never" and a
        # positive length penalty, assume it grows to max_len; otherwise judge it at its current length.
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_len - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_length ** length_penalty)
        worst_finished = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], NEG_INF_SCORE)
        can_improve = can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        all_done = torch.all(is_finished) & (early_stopping is True)
        if not (torch.any(can_improve) and not all_done and not torch.all(hits_stop)):
            break
        cache.reorder((kept_source + batch_offset).flatten())
        logits = next_token_logits(model, cache, running[:, :, cur_len - 1].reshape(-1, 1))

    return finished[:, 0, : prompt_len + int(finished_lengths[:, 0].max())]


# ---- models, tokenizers and stop tokens from files -----------------------------------------------

@dataclass
class StopTokens:
    eos_token_id: list[int]  # generation stops at any of these
    pad_token_id: int | None  # fills rows that stopped early in a batch


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def gguf_tokenizer_and_stops(path: Path, tokenizer_path):
    """For a .gguf: its own tokenizer (as `convert_gguf_to_hf` writes it) and llama.cpp's stop tokens."""
    import gguf

    from megakor.checkpoint.gguf import read_metadata
    from megakor.tokenizer import tokenizer_for

    metadata = read_metadata(gguf.GGUFReader(path))
    tokenizer = tokenizer_for(path, tokenizer_path)
    # Chat models stop at end-of-turn tokens as well as at EOS (what convert_gguf_to_hf writes).
    eos = [metadata.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    stops = StopTokens(list(dict.fromkeys(i for i in eos if i is not None)),
                       metadata.get("tokenizer.ggml.padding_token_id"))
    return tokenizer, stops


def _hf_stops(path: Path, model, tokenizer) -> StopTokens:
    """generation_config.json's EOS/pad ids when the directory has one, else config.json's (as transformers)."""
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if (path / "generation_config.json").is_file():
        config = {**config, **json.loads((path / "generation_config.json").read_text())}
    eos = _as_list(config.get("eos_token_id", model.args.eos_token_id)) or _as_list(tokenizer.eos_token_id)
    return StopTokens(eos, config.get("pad_token_id"))


def load_for_generation(model_path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer, StopTokens) for an HF or megakor checkpoint directory or a .gguf
    file. A preset name gives a randomly initialised model and needs `tokenizer_path`."""
    from megakor.checkpoint.source import build_model
    from megakor.tokenizer import load_tokenizer, tokenizer_for

    path = Path(model_path)
    model, ckpt = build_model(str(model_path), device=device, dtype=dtype)
    model.eval()
    if path.suffix == ".gguf":
        tokenizer, stops = gguf_tokenizer_and_stops(path, tokenizer_path)
    elif path.is_dir():
        tokenizer = tokenizer_for(path, tokenizer_path, ckpt)
        stops = _hf_stops(path, model, tokenizer)
    else:
        if tokenizer_path is None:
            raise ValueError(f"{model_path} is a preset with no tokenizer; pass a tokenizer directory too")
        tokenizer = load_tokenizer(tokenizer_path)
        stops = StopTokens(_as_list(model.args.eos_token_id), tokenizer.pad_token_id)
    return model, tokenizer, stops


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """Token ids [1, T] of a prompt; with `chat`, as the user turn of the tokenizer's chat template
    followed by the assistant's header (add_generation_prompt=True)."""
    if chat:
        if not tokenizer.chat_template:
            raise ValueError("this tokenizer has no chat template; drop --chat or pass a chat model's --tokenizer")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)
