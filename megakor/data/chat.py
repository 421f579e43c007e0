"""Task data for supervised fine-tuning: chat examples rendered with the tokenizer's own chat template,
with a per-token loss mask that trains only what the assistant says.

An example is a JSON object with either
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
or  {"prompt": "...", "response": "..."}  (= one user turn and one assistant turn; optional "system").

Rendering: `tokenizer.apply_chat_template(messages, tokenize=False)` where the tokenizer has a chat
template (SmolLM2-Instruct, Llama 3 instruct), else `PLAIN_TEMPLATE` below. The rendered text is
tokenised with `add_special_tokens=False` (templates write their own BOS), so the ids equal
`apply_chat_template(messages, tokenize=True)`.

Loss mask: 1 on the tokens of each assistant turn's content and its end-of-turn token (SmolLM2's
`<|im_end|>`, Llama 3's `<|eot_id|>`), 0 everywhere else (system and user turns, role headers, the
newline a template writes after the end-of-turn token). Each assistant turn is located by rendering the
conversation up to it with `add_generation_prompt=True` and up to and including it: the text between
the two is the turn, trained up to the end of the first special token after its content. A token is
trained when any of its characters is.
"""

from __future__ import annotations

import json

import numpy as np

ROLES = ("system", "user", "assistant")

# For tokenizers without a chat template (base models). Documented so users can reproduce it:
#   "### System:\n{system}\n\n" (when there is a system turn)
#   "### User:\n{user}\n\n### Assistant:\n{assistant}{eos}\n\n" per exchange
# The assistant's content and the EOS after it are trained.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


class BadExample(ValueError):
    """A record that cannot be a training example; `reason` is the skip counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def messages_of(record) -> list[dict]:
    """The chat messages of a record (`messages`, or `prompt`/`response` with an optional `system`)."""
    if not isinstance(record, dict):
        raise BadExample("malformed_json", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadExample("bad_messages", "'messages' must be a non-empty list of {role, content}")
    elif "prompt" in record and "response" in record:
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise BadExample("missing_field", f"no 'messages' or 'prompt'/'response' (keys: {sorted(record)[:8]})")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadExample("bad_messages", f"a message must be {{role: one of {ROLES}, content: string}}, got {m!r}"[:300])
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise BadExample("no_assistant_turn", "the example has no non-empty assistant turn to train on")
    return out


def chat_template_of(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or PLAIN_TEMPLATE


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, by the tokenizer's chat template (or `PLAIN_TEMPLATE`)."""
    return tokenizer.apply_chat_template(messages, chat_template=chat_template_of(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _special_strings(tokenizer) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = {t.content for t in decoder.values() if t.content}
    if tokenizer.eos_token:
        strings.add(tokenizer.eos_token)
    return sorted(strings, key=len, reverse=True)


def trained_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character spans that are trained])."""
    text = render(tokenizer, messages)
    specials = _special_strings(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        turn = upto[len(before):]
        content_at = turn.find(m["content"].strip()) if m["content"].strip() else -1
        search_from = content_at + len(m["content"].strip()) if content_at >= 0 else 0
        hits = [(turn.find(s, search_from), s) for s in specials if turn.find(s, search_from) >= 0]
        end = min(hits)[0] + len(min(hits)[1]) if hits else len(turn.rstrip())
        start = content_at if content_at >= 0 else 0
        # Templates may close a prefix differently (Llama 3's always ends with an assistant header), but
        # the conversation must agree with its prefix up to the end of this turn.
        if not (upto.startswith(before) and text[: len(before) + end] == upto[: len(before) + end]):
            raise BadExample("template_not_incremental", "the chat template renders a conversation differently from "
                                                         "its beginning; cannot tell which tokens are the assistant's")
        spans.append((len(before) + start, len(before) + end))
    return text, spans


def encode_example(tokenizer, messages: list[dict]) -> tuple[list[int], np.ndarray]:
    """(token ids, loss mask uint8) of one rendered example (module docstring)."""
    text, spans = trained_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = np.zeros(len(ids), dtype=np.uint8)
    for j, (a, b) in enumerate(offsets):
        b = max(b, a + 1)  # special tokens can report an empty span
        if any(a < e and s < b for s, e in spans):
            mask[j] = 1
    return ids, mask


def encode_record_line(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    """`encode_example` of a JSON record given as text (how preprocessing hands records over)."""
    try:
        record = json.loads(text)
    except ValueError as e:
        raise BadExample("malformed_json", str(e)) from None
    return encode_example(tokenizer, messages_of(record))


def prompt_and_reference(tokenizer, record) -> tuple[list[int], str]:
    """For generation-mode evaluation: (ids of the conversation up to its last assistant turn, followed by
    the assistant header), and that turn's content as the reference."""
    messages = messages_of(record)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = render(tokenizer, messages[:last], add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"], messages[last]["content"]
