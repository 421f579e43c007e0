"""KV-cached generation against transformers' `generate`, token for token.

Tiny random checkpoints of several families (GQA, biases, tied head, sliding window, dynamic RoPE past
its context), then the real SmolLM2-135M-Instruct converted from its GGUF once per session. The
cache itself is checked against the no-cache forward, and sampling against a model whose next-token
distribution is known by construction.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import transformers

from megakor.checkpoint.gguf import convert_gguf_to_hf, fetch_smollm2_gguf
from megakor.generate import (KVCache, gguf_tokenizer_and_stops, encode_prompt, generate, load_for_generation,
                              top_p_filter)
from megakor.checkpoint.source import build_model
from megakor.model import Llama, ModelArgs

from conftest import FAMILIES, REPO

PROMPT_LEN, NEW_TOKENS = 24, 12  # 36 positions: past Mistral's window (24) and dynamic RoPE's context (32)
TOLERANCE = 1e-5  # max-abs on fp32 logits


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decoding is many small matmuls; on a shared CPU two OpenMP threads spin-wait on each other
    (measured 20-50 s against 2 s for one SmolLM2 beam search), so this file runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _prompt(batch=1, length=PROMPT_LEN, seed=0):
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    """family -> (transformers model, megakor model, stop tokens), each loaded once."""
    cache = {}

    def get(family):
        if family not in cache:
            model, _, stops = load_for_generation(hf_checkpoints[family])
            cache[family] = (_hf(hf_checkpoints[family]), model, stops)
        return cache[family]
    return get


# ---- tiny checkpoints: greedy and beam search equal transformers ----------------------------------

@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("family", ["llama3", "qwen2", "tied", "mistral", "llama_dynamic"])
def test_matches_transformers(loaded, family, num_beams):
    ref, model, stops = loaded(family)
    ids = _prompt()
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=NEW_TOKENS, num_beams=num_beams, do_sample=False)
    got = generate(model, ids, NEW_TOKENS, stops.eos_token_id, stops.pad_token_id, num_beams=num_beams)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("penalty,ngram", [(1.3, 0), (1.0, 2), (0.7, 3), (1.2, 3)])
def test_repetition_settings_match_transformers(loaded, penalty, ngram):
    ref, model, stops = loaded("tied")
    ids = _prompt().repeat(1, 2)[:, :PROMPT_LEN]  # a prompt that repeats itself, so n-grams recur
    ids = torch.cat([ids, ids], dim=0)  # two rows: the n-gram bans are per row
    ids[1, -1] = 5
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=2 * NEW_TOKENS, do_sample=False, repetition_penalty=penalty,
                                no_repeat_ngram_size=ngram)
    got = generate(model, ids, 2 * NEW_TOKENS, stops.eos_token_id, stops.pad_token_id, repetition_penalty=penalty,
                   no_repeat_ngram_size=ngram)
    assert got.tolist() == expected.tolist()
    if ngram:  # and the constraint holds: no generated token completes an n-gram seen before it
        eos = set(stops.eos_token_id if isinstance(stops.eos_token_id, list) else [stops.eos_token_id])
        for row in got.tolist():
            for j in range(PROMPT_LEN, len(row)):
                if row[j] in eos:
                    break
                earlier = {tuple(row[i:i + ngram]) for i in range(j - ngram + 1)}
                assert tuple(row[j - ngram + 1:j + 1]) not in earlier


@pytest.mark.parametrize("num_beams,early_stopping,length_penalty",
                         [(1, False, 1.0), (3, True, 1.0), (3, "never", 2.0), (2, False, 0.5)])
def test_stops_at_eos_like_transformers(loaded, num_beams, early_stopping, length_penalty):
    """Two EOS ids taken from what the model writes anyway, so rows and beams really do finish early."""
    ref, model, _ = loaded("llama3")
    prompt_len = 20
    ids = _prompt(batch=2, length=prompt_len, seed=4)
    free = generate(model, ids, NEW_TOKENS)
    eos = [int(free[0, prompt_len + 2]), int(free[1, prompt_len + 5])]
    kwargs = dict(max_new_tokens=NEW_TOKENS, num_beams=num_beams, early_stopping=early_stopping,
                  length_penalty=length_penalty)
    with torch.no_grad():
        expected = ref.generate(ids, do_sample=False, eos_token_id=eos, pad_token_id=2, **kwargs)
    got = generate(model, ids, eos_token_id=eos, pad_token_id=2, **kwargs)
    assert got.tolist() == expected.tolist()
    if num_beams == 1:  # both rows stopped at their EOS; the shorter one is padded
        assert got.shape[1] == prompt_len + 6 and got[0, -1] == 2 and got[1, -1] == eos[1]


# ---- the cache against the no-cache forward --------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_logits_equal_full_forward(hf_checkpoints, family):
    """Prefill, a 3-token chunk (queries behind a non-empty cache), then single tokens; 30 positions,
    past the sliding window but inside dynamic RoPE's context, where a full forward must agree."""
    model, _ = build_model(str(hf_checkpoints[family]))
    model.eval()
    ids = _prompt(length=30, seed=7)
    with torch.no_grad():
        full = model(ids)[0]
        cache = KVCache(model, 1, 30)
        steps = [(0, 12), (12, 15)] + [(t, t + 1) for t in range(15, 30)]
        for start, end in steps:
            positions = torch.arange(start, end).unsqueeze(0)
            cached = model.logits(model.hidden_states(ids[:, start:end], positions, kv_cache=cache))[0]
            assert (cached - full[start:end]).abs().max().item() < TOLERANCE, (start, end)
    assert cache.length == 30


# ---- sampling --------------------------------------------------------------------------------------

def test_sampling_is_seeded_and_matches_transformers(loaded):
    ref, model, stops = loaded("llama3")
    ids = _prompt(batch=2, seed=5)
    kwargs = dict(do_sample=True, temperature=0.7, top_p=0.9)

    def sample(seed):
        return generate(model, ids, NEW_TOKENS, stops.eos_token_id, stops.pad_token_id,
                        generator=torch.Generator().manual_seed(seed), **kwargs)

    first = sample(11)
    assert torch.equal(first, sample(11))
    assert not torch.equal(first, sample(12))
    # transformers draws from the global generator; seeded alike, torch.multinomial draws alike.
    torch.manual_seed(11)
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=NEW_TOKENS, top_k=0, **kwargs)
    assert first.tolist() == expected.tolist()


def _fixed_distribution_model(probs: list[float]) -> Llama:
    """A model whose next-token distribution is `probs` after any input: zero attention and MLP outputs
    leave every hidden state at ones (all-ones embeddings, unit norms), and head row i is log p_i / D."""
    args = ModelArgs(vocab_size=len(probs), hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                     num_kv_heads=1, max_position_embeddings=64)
    model = Llama(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name or "embeddings" in name else 0.0)
        model.lm_head.weight[: len(probs)].copy_(torch.tensor(probs).log()[:, None].expand(-1, 8) / 8)
    return model.eval()


def test_top_p_samples_only_the_nucleus():
    probs = [0.06, 0.4, 0.04, 0.3, 0.2]
    model = _fixed_distribution_model(probs)
    prompt = torch.zeros(4000, 1, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(model(prompt[:1])[0, -1].softmax(-1), torch.tensor(probs), atol=1e-6)

    def draw(top_p, temperature=1.0):
        out = generate(model, prompt, 1, do_sample=True, top_p=top_p, temperature=temperature,
                       generator=torch.Generator().manual_seed(0))
        return torch.bincount(out[:, 1], minlength=len(probs)).float() / len(prompt)

    # 0.4 + 0.3 = 0.7 < 0.75, so the nucleus needs 0.2 too; 0.06 and 0.04 fall outside.
    freq = draw(0.75)
    nucleus = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.2]) / 0.9
    assert freq[0] == 0 and freq[2] == 0
    assert (freq - nucleus).abs().max() < 0.03
    assert (draw(1.0) - torch.tensor(probs)).abs().max() < 0.03  # no filtering: the model's distribution
    assert draw(0.3)[1] == 1.0  # a nucleus smaller than the top token keeps that token alone
    # Temperature 0.5 squares the probabilities before renormalising.
    squared = torch.tensor(probs) ** 2
    assert (draw(1.0, temperature=0.5) - squared / squared.sum()).abs().max() < 0.03
    logits = torch.tensor([probs]).log()
    assert torch.isinf(top_p_filter(logits, 0.75)[0, [0, 2]]).all()
    assert math.isfinite(top_p_filter(logits, 0.75)[0, 4].item())


# ---- SmolLM2-135M-Instruct, converted from its GGUF ------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf_path = fetch_smollm2_gguf()
    directory = convert_gguf_to_hf(gguf_path, tmp_path_factory.mktemp("smollm2"))
    model, tokenizer, stops = load_for_generation(directory)
    return gguf_path, directory, _hf(directory), model, tokenizer, stops


@pytest.mark.parametrize("prompt,chat,max_new_tokens,answer", [
    ("What is the capital of France?", True, 9, "The capital of France is Paris."),
    ("대한민국의 수도는", False, 6, None),
])
def test_smollm2_matches_transformers(smollm2, prompt, chat, max_new_tokens, answer):
    _, _, ref, model, tokenizer, stops = smollm2
    ids = encode_prompt(tokenizer, prompt, chat)
    for num_beams in (1, 3):
        with torch.no_grad():
            expected = ref.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        got = generate(model, ids, max_new_tokens, stops.eos_token_id, stops.pad_token_id, num_beams=num_beams)
        assert got.tolist() == expected.tolist(), num_beams
        if answer is not None:
            assert tokenizer.decode(got[0, ids.shape[1]:], skip_special_tokens=True) == answer
            assert got[0, -1].item() in stops.eos_token_id


def test_gguf_tokenizer_and_stops_equal_the_converted_ones(smollm2):
    gguf_path, directory, ref, _, tokenizer, stops = smollm2
    gguf_tokenizer, gguf_stops = gguf_tokenizer_and_stops(gguf_path, None)
    assert gguf_stops == stops and stops.eos_token_id == [ref.generation_config.eos_token_id]
    for prompt, chat in [("What is the capital of France?", True), ("대한민국의 수도는 서울.", False)]:
        assert torch.equal(encode_prompt(gguf_tokenizer, prompt, chat), encode_prompt(tokenizer, prompt, chat))


# ---- the command line ------------------------------------------------------------------------------

def test_cli_prints_the_greedy_continuation(loaded, hf_checkpoints, capsys):
    spec = importlib.util.spec_from_file_location("launch_generate", REPO / "launch/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    main = module.main
    ref, _, _ = loaded("qwen2")
    path = hf_checkpoints["qwen2"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    ids = tokenizer("대한민국은", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=8, do_sample=False)
    assert main(["--model", str(path), "--prompt", "대한민국은", "--max-new-tokens", "8", "--greedy"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    with pytest.raises(SystemExit) as exited:
        main(["--model", str(path), "--prompt", "x", "--num-beams", "2", "--top-p", "0.9"])
    assert exited.value.code == 2  # argparse's usage error
    assert "error: choose one of --greedy, sampling (--top-p/--temperature) or --num-beams" in capsys.readouterr().err
    assert main(["--model", str(path.parent / "absent"), "--prompt", "x"]) == 2  # the model.init_from resolver
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model='{path.parent / 'absent'}' is neither an existing path") \
        and err.count("\n") == 1, err

