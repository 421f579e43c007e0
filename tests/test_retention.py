"""megakor.retention: the chat-answer scorer and the probe count against independent computations,
on a tiny random checkpoint; the instruction split and the probe set's shape."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from megakor import retention
from megakor.corpora import CorpusUnavailable
from megakor.checkpoint.source import build_model
from megakor.tokenizer import load_tokenizer

from conftest import make_hf_checkpoint

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
PAIRS = [("What does the keyword `pass` do?", "It does nothing."),
         ("Explain lists.", "A list holds items in order, 대한민국."),
         ("Why?", "Because.")]


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("chat") / "m", "llama2")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = CHATML
    tok.save_pretrained(str(path))
    return path


def test_answer_bits_per_char_equals_transformers_log_probs(chat_checkpoint):
    model, _ = build_model(str(chat_checkpoint))
    tok = load_tokenizer(chat_checkpoint)
    got = retention.answer_bits_per_char(model, tok, PAIRS, batch_size=2)  # padding inside a batch
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(chat_checkpoint), dtype=torch.float32).eval()
    nll, chars = 0.0, 0
    for instruction, answer in PAIRS:
        prompt = tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True,
                                         tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = ref(torch.tensor([p + a])).logits[0].double().log_softmax(-1)
        nll -= sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))
        chars += len(answer)
    assert got["chars"] == chars
    assert got["bits_per_char"] == pytest.approx(nll / math.log(2) / chars, rel=1e-5)


def test_batched_greedy_answers_equal_one_at_a_time(chat_checkpoint):
    questions = ["What is the capital of France?", "Hi", "What does Python's built-in `len` do? Answer briefly."]
    batched = retention.greedy_chat_answers(chat_checkpoint, questions, 6, batch_size=3)
    single = [retention.greedy_chat_answers(chat_checkpoint, [q], 6)[0] for q in questions]
    assert batched == single


def test_probes_count_what_the_base_got_right_and_the_model_keeps(chat_checkpoint):
    questions = ["What is the capital of A?", "What is the capital of B?", "What is the capital of C?"]
    said = retention.greedy_chat_answers(chat_checkpoint, questions, retention.PROBE_TOKENS)
    word = [w for w in retention._fold(said[0]).split() if w][0]
    # The base got A and B right (its recorded answers name the capital), C wrong; the model's own
    # answer to A names `word`, its answer to B cannot name "zzzqqq".
    reference = {"heldout": [list(p) for p in PAIRS],
                 "probes": [[questions[0], word, f"It is {word}."], [questions[1], "zzzqqq", "zzzqqq!"],
                            [questions[2], "Paris", "Lyon"]]}
    got = retention.retention(chat_checkpoint, reference, base_bits_per_char=2.0)
    assert (got["probes"], got["probes_base_right"], got["probes_kept"]) == (3, 2, 1)
    assert got["probes_lost"] == [questions[1]]
    assert got["chat_bits_per_char_ratio"] == pytest.approx(got["chat_bits_per_char"] / 2.0)


def test_names_answer_is_whole_words_without_case_or_accents():
    assert retention.names_answer("The capital of France is Paris.", "Paris")
    assert retention.names_answer("It's bogota, of course", "Bogotá")
    assert retention.names_answer("NEW DELHI!", "New Delhi")
    assert not retention.names_answer("A Parisian city", "Paris")
    assert not retention.names_answer("The capital is Lyon.", "Paris")


def test_instruction_split_is_fixed_disjoint_and_large_enough():
    replay, heldout = retention.split_instructions()
    assert len(heldout) >= 100
    assert {i.id for i in replay}.isdisjoint(i.id for i in heldout)
    assert [i.id for i in retention.split_instructions()[1]] == [i.id for i in heldout]
    assert len({i.text for i in replay + heldout}) == len(replay) + len(heldout)


def test_capital_probes_are_never_instructions():
    try:
        probes = retention.capital_probes()
    except CorpusUnavailable as e:
        pytest.skip(str(e))
    assert len(probes) == retention.PROBE_COUNTRIES
    assert retention.Probe("What is the capital of France?", "Paris") in probes
    texts = {i.text for i in retention.instructions()}
    assert not texts & {p.question for p in probes}
