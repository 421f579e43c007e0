"""Tokenizer-independent evaluation: bits per character and per UTF-8 byte.

The protocol, fixed so numbers compare across tools and vocabularies: for each document,
s = [BOS] + tokenizer(text) (no EOS; a tokenizer without BOS uses its EOS as the separator);
s is cut into consecutive chunks of at most L tokens; inside each chunk every token after the first is
predicted; NLL is summed over all predicted tokens.

    bits_per_char = Σ NLL / ln 2 / Σ characters        bits_per_byte = Σ NLL / ln 2 / Σ UTF-8 bytes

Chunks are packed several to a row (positions restart per chunk, attention never crosses chunks), so
short documents do not waste compute on padding; the numbers equal chunk-by-chunk evaluation.

Task sets (chat examples, `megakor.data.chat`) are evaluated in generation mode: the conversation up to
its last assistant turn is the prompt, the greedy (or beam) answer is scored against that turn with
chrF (sacrebleu), and the response-only loss is the teacher-forced NLL per assistant token.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def read_jsonl_texts(path: str | Path, text_field: str = "text", max_docs: int | None = None):
    """(texts, skipped) from a JSONL file; malformed lines are skipped and counted by reason, never fatal."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"evaluation data {p} does not exist; pass a JSONL file with a '{text_field}' field")
    texts, skipped = [], Counter()
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if max_docs is not None and len(texts) >= max_docs:
                break
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                log.warning("%s:%d: skipped, invalid UTF-8", p, lineno)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skipped["malformed_json"] += 1
                log.warning("%s:%d: skipped, malformed JSON", p, lineno)
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                skipped["missing_text_field"] += 1
                log.warning("%s:%d: skipped, no string field '%s'", p, lineno, text_field)
                continue
            if not text:
                skipped["empty"] += 1
                continue
            texts.append(text)
    return texts, dict(skipped)


def document_chunks(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """[BOS] + ids of each document, cut into consecutive chunks of at most seq_len tokens."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer defines neither a BOS nor an EOS token; set bos_token in tokenizer_config.json")
    chunks = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        s = [start] + list(ids)
        chunks.extend(s[i:i + seq_len] for i in range(0, len(s), seq_len))
    return [c for c in chunks if len(c) > 1]


def pack_chunks(chunks: list[list[int]], seq_len: int, pad_id: int = 0):
    """Rows of (input_ids, position_ids, labels), each row holding whole chunks (first fit, in order)."""
    rows, current = [], []
    for c in chunks:
        if sum(map(len, current)) + len(c) > seq_len:
            rows.append(current)
            current = []
        current.append(c)
    if current:
        rows.append(current)
    packed = []
    for row in rows:
        ids, pos, labels = [], [], []
        for c in row:
            ids += c
            pos += range(len(c))
            labels += c[1:] + [-100]
        pad = seq_len - len(ids)
        ids += [pad_id] * pad
        pos += range(pad)
        labels += [-100] * pad
        packed.append((ids, pos, labels))
    return packed


@torch.no_grad()
def evaluate_texts(model, tokenizer, texts: list[str], seq_len: int = 2048, batch_size: int = 4,
                   device: str | torch.device | None = None) -> dict:
    """Summed NLL over the protocol's predicted tokens, and the per-character/byte figures."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = document_chunks(tokenizer, texts, seq_len)
    rows = pack_chunks(chunks, seq_len)
    nll, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        ids, pos, labels = (torch.tensor([r[j] for r in batch], device=device) for j in range(3))
        hidden = model.hidden_states(ids, pos)
        nll += float(model.loss(hidden, labels, reduction="sum"))
        tokens += int((labels != -100).sum())
    model.train(was_training)
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "loss": nll / max(tokens, 1),
        "tokens": tokens,
        "chars": chars,
        "bytes": nbytes,
        "bits_per_char": nll / math.log(2) / max(chars, 1),
        "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
        "documents": len(texts),
    }


def evaluate_file(model, tokenizer, path, seq_len: int = 2048, max_docs: int | None = None, batch_size: int = 4,
                  text_field: str = "text") -> dict:
    texts, skipped = read_jsonl_texts(path, text_field, max_docs)
    if not texts:
        raise ValueError(f"{path} holds no document to evaluate ({sum(skipped.values())} lines skipped: {skipped}); "
                         f"check that each line is a JSON object with a '{text_field}' string (--text-field)")
    result = evaluate_texts(model, tokenizer, texts, seq_len, batch_size)
    result["skipped"] = sum(skipped.values())
    result["skipped_reasons"] = skipped
    return result


# ---- task sets: generation scored with chrF, and response-only loss ---------------------------------

def read_task_examples(path: str | Path, max_docs: int | None = None) -> tuple[list[dict], dict]:
    """(chat records, skipped counts) from a task JSONL file (`messages` or `prompt`/`response` per line)."""
    from megakor.data.chat import messages_of

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task data {p} does not exist; pass a JSONL file of messages or prompt/response")
    records, skipped = [], Counter()
    with open(p, encoding="utf-8", errors="replace") as f:
        for line in f:
            if max_docs is not None and len(records) >= max_docs:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                messages_of(record)
            except ValueError as e:
                skipped[getattr(e, "reason", "malformed_json")] += 1
                continue
            records.append(record)
    return records, dict(skipped)


def pack_examples(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int = 0):
    """Rows of (input_ids, position_ids, labels) holding whole examples (first fit, in order), labels -100
    except where the example's loss mask trains the token; examples longer than seq_len are truncated."""
    rows, current, used = [], [], 0
    for ids, mask in examples:
        ids, mask = list(ids[:seq_len]), list(mask[:seq_len])
        if current and used + len(ids) > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append((ids, mask))
        used += len(ids)
    if current:
        rows.append(current)
    packed = []
    for row in rows:
        ids, pos, labels = [], [], []
        for e, m in row:
            ids += e
            pos += range(len(e))
            labels += [t if keep else -100 for t, keep in zip(e[1:], m[1:])] + [-100]
        pad = seq_len - len(ids)
        packed.append((ids + [pad_id] * pad, pos + list(range(pad)), labels + [-100] * pad))
    return packed


@torch.no_grad()
def response_loss(model, tokenizer, records: list[dict], seq_len: int = 2048, batch_size: int = 4) -> dict:
    """Mean NLL per trained (assistant) token of the rendered examples, teacher-forced."""
    from megakor.data.chat import encode_example, messages_of

    device = next(model.parameters()).device
    rows = pack_examples([encode_example(tokenizer, messages_of(r)) for r in records], seq_len)
    nll, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids, pos, labels = (torch.tensor([r[j] for r in rows[i:i + batch_size]], device=device) for j in range(3))
        nll += float(model.loss(model.hidden_states(ids, pos), labels, reduction="sum"))
        tokens += int((labels != -100).sum())
    return {"response_loss": nll / max(tokens, 1), "response_tokens": tokens}


def generate_outputs(model, tokenizer, records: list[dict], stop_ids, max_new_tokens: int = 128,
                     num_beams: int = 1) -> tuple[list[str], list[str], list[str]]:
    """(prompts' last user turn, references, greedy or beam outputs) of each task example."""
    from megakor.data.chat import messages_of, prompt_and_reference
    from megakor.generate import generate

    device = next(model.parameters()).device
    sources, refs, outs = [], [], []
    for r in records:
        ids, ref = prompt_and_reference(tokenizer, r)
        prompt = torch.tensor([ids], device=device)
        out = generate(model, prompt, max_new_tokens, stop_ids, num_beams=num_beams)
        outs.append(tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip())
        refs.append(ref)
        sources.append(next(m["content"] for m in reversed(messages_of(r)) if m["role"] == "user"))
    return sources, refs, outs


def chrf(outputs: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu's defaults: character 6-grams, beta 2), 0-100."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().corpus_score(outputs, [references]).score)


def evaluate_task(model, tokenizer, records: list[dict], stop_ids, seq_len: int = 2048, max_new_tokens: int = 128,
                  num_beams: int = 1, batch_size: int = 4, samples: int = 5) -> dict:
    """chrF of generated answers against the references, response-only loss, and a few side-by-side samples."""
    if not records:
        raise ValueError("no task example to evaluate")
    was_training = model.training
    model.eval()
    try:
        result = response_loss(model, tokenizer, records, seq_len, batch_size)
        sources, refs, outs = generate_outputs(model, tokenizer, records, stop_ids, max_new_tokens, num_beams)
    finally:
        model.train(was_training)
    result.update(chrf=chrf(outs, refs), examples=len(records),
                  samples=[{"source": s, "reference": r, "output": o} for s, r, o in zip(sources, refs, outs)][:samples])
    return result
