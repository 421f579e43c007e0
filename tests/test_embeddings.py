"""Embedding / LM-head growth, new-row initialisation and old-row freezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megakor.tokenizer import embeddings, extend

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared/fixtures"
KOREAN = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "김프에서 새 레이어를 만들려면 레이어 메뉴를 누르세요. 레이어는 이미지의 층입니다.",
    "데비안 패키지는 패키지 관리자로 설치합니다. 똠방각하 쀍 햏 뷁.",
] * 3
NUM_NEW = 40
CHEAP = pytest.mark.parametrize("pair", ["tiny", "llama2"], indirect=True)


def _tiny_byte_level(path: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. 가나다"] * 5,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


@pytest.fixture(scope="module", params=["tiny", "llama2", "llama3"])
def pair(request, tmp_path_factory):
    """(base tokenizer, extended tokenizer, kind) with NUM_NEW Korean tokens. Tests other than the
    exactness one use the two cheaper kinds (one byte-level, one byte-fallback)."""
    root = tmp_path_factory.mktemp(f"emb-{request.param}")
    if request.param == "tiny":
        base_path = _tiny_byte_level(root / "tokenizer.json")
    else:
        base_path = FIXTURES / "tokenizers" / request.param
        if not (base_path / "tokenizer.json").exists():
            pytest.skip(f"{base_path} is absent (shared fixtures not checked out)")
    extension = extend.extend_tokenizer(base_path, KOREAN, NUM_NEW, root / "out", min_frequency=1)
    assert len(extension.new_tokens) == NUM_NEW
    return extend.as_backend(base_path), extend.as_backend(root / "out"), extension.kind


def _spelling(base: Tokenizer, ids: list[int], kind: str) -> bytes:
    """The bytes a run of base tokens spells, read straight off their vocabulary strings."""
    out = b""
    for i in ids:
        token = base.id_to_token(i)
        if kind == extend.BYTE_LEVEL:
            out += extend.byte_level_to_bytes(token)
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:
            out += bytes([int(token[3:5], 16)])
        else:
            out += token.encode()
    return out


def _integer_weight(rows: int, hidden: int = 16, seed: int = 0) -> torch.Tensor:
    # Small integers: every sum is exact in float64, so the expected mean has one correct rounding.
    return torch.randint(-1000, 1000, (rows, hidden), generator=torch.Generator().manual_seed(seed)).float()


def test_subword_rows_are_exact_means_of_the_decomposition(pair):
    base, new, kind = pair
    base_size, new_size = extend.full_vocab_size(base), extend.full_vocab_size(new)
    assert new_size == base_size + NUM_NEW
    weight = _integer_weight(base_size)
    grown = embeddings.resize_rows(weight, base, new, "subword", pad_to_multiple_of=64)
    assert grown.shape == (embeddings.padded_vocab_size(new_size, 64), 16) and grown.shape[0] % 64 == 0
    assert torch.equal(grown[:base_size], weight)
    assert torch.count_nonzero(grown[new_size:]) == 0
    decompositions = embeddings.new_token_decompositions(base, new)
    assert sorted(decompositions) == list(range(base_size, new_size))
    for index, pieces in decompositions.items():
        token = new.id_to_token(index)
        spelled = extend.byte_level_to_bytes(token) if kind == extend.BYTE_LEVEL else token.encode()
        assert _spelling(base, pieces, kind) == spelled and max(pieces) < base_size
        expected = (sum(weight[j].double() for j in pieces) / len(pieces)).float()
        assert torch.equal(grown[index], expected), token


@CHEAP
def test_mean_and_random_initialisation(pair):
    base, new, _ = pair
    base_size, new_size = extend.full_vocab_size(base), extend.full_vocab_size(new)
    weight = torch.randn(base_size, 16, generator=torch.Generator().manual_seed(1)) * 0.02 + 0.01
    grown = embeddings.resize_rows(weight, base, new, "mean")
    expected = weight.double().mean(0).float()
    assert all(torch.equal(grown[i], expected) for i in range(base_size, new_size))

    first, _ = embeddings.resize_embeddings(weight, None, base, new, "random", seed=3)
    again, _ = embeddings.resize_embeddings(weight, None, base, new, "random", seed=3)
    other, _ = embeddings.resize_embeddings(weight, None, base, new, "random", seed=4)
    assert torch.equal(first, again) and not torch.equal(first[base_size:], other[base_size:])
    assert torch.equal(first[:base_size], weight)
    # 640 draws: the sample std is within ~5% of the base std (0.02) with overwhelming probability.
    assert first[base_size:].std().item() == pytest.approx(weight.double().std().item(), rel=0.15)


@CHEAP
def test_padded_checkpoint_rows_and_untied_head(pair):
    """A Qwen2-style checkpoint has more rows than tokenizer ids; new tokens take the first spare
    rows, the remaining spare rows keep their values. The untied head uses its own rows."""
    base, new, _ = pair
    base_size, new_size = extend.full_vocab_size(base), extend.full_vocab_size(new)
    embed, head = _integer_weight(base_size + 100, seed=1), _integer_weight(base_size + 100, seed=2)
    new_embed, new_head = embeddings.resize_embeddings(embed, head, base, new, "subword", pad_to_multiple_of=8)
    assert new_embed.shape == new_head.shape == embed.shape  # base_size + 100 already exceeds new_size
    assert torch.equal(new_embed[new_size:], embed[new_size:])
    assert torch.equal(new_head[:base_size], head[:base_size])
    index, pieces = next(iter(embeddings.new_token_decompositions(base, new).items()))
    assert torch.equal(new_head[index], (sum(head[j].double() for j in pieces) / len(pieces)).float())
    assert torch.equal(new_embed[index], (sum(embed[j].double() for j in pieces) / len(pieces)).float())


@CHEAP
def test_tied_head_and_bf16(pair):
    base, new, _ = pair
    base_size = extend.full_vocab_size(base)
    weight = torch.randn(base_size, 16, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    new_embed, new_head = embeddings.resize_embeddings(weight, weight, base, new)
    assert new_head is new_embed and new_embed.dtype == torch.bfloat16
    index, pieces = next(iter(embeddings.new_token_decompositions(base, new).items()))
    expected = (sum(weight[j].double() for j in pieces) / len(pieces)).to(torch.bfloat16)
    assert torch.equal(new_embed[index], expected)


@CHEAP
def test_bad_inputs_name_the_fix(pair):
    base, new, _ = pair
    base_size = extend.full_vocab_size(base)
    with pytest.raises(ValueError, match="pass the weights of the model"):
        embeddings.resize_rows(torch.zeros(base_size - 1, 4), base, new)
    with pytest.raises(ValueError, match="use one of subword, mean, random"):
        embeddings.resize_rows(torch.zeros(base_size, 4), base, new, "zeros")
    with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
        embeddings.resize_rows(torch.zeros(base_size, 4), base, new, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="pass the tokenizer it was extended from"):
        embeddings.new_token_decompositions(new, base)


def _train(embed: torch.nn.Embedding, head: torch.nn.Linear, optimizer, steps: int = 6) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, embed.num_embeddings, (4, 12), generator=generator)
        logits = head(embed(tokens[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@CHEAP
def test_hf_model_keeps_its_outputs_on_text_without_hangul(pair):
    """End to end with a tiny transformers Llama: grow its embedding and untied head, and English
    logits over the old vocabulary are exactly what they were (same ids, same rows)."""
    import transformers

    base, new, _ = pair
    base_size = extend.full_vocab_size(base)
    config = transformers.LlamaConfig(vocab_size=base_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    english = torch.tensor([base.encode("The quick brown fox jumps over the lazy dog.").ids])
    with torch.no_grad():
        before = model(english, output_hidden_states=True)
    embed, head = embeddings.resize_embeddings(model.get_input_embeddings().weight.data,
                                               model.get_output_embeddings().weight.data, base, new,
                                               pad_to_multiple_of=16)
    model.resize_token_embeddings(embed.shape[0])
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embed)
        model.get_output_embeddings().weight.copy_(head)
        after = model(torch.tensor([new.encode("The quick brown fox jumps over the lazy dog.").ids]),
                      output_hidden_states=True)
        korean = model(torch.tensor([new.encode(KOREAN[0]).ids])).logits
    # The final hidden states are bit-identical; the head's matmul over more rows may block the
    # reduction differently, hence a float32 rounding tolerance on the logits.
    assert torch.equal(after.hidden_states[-1], before.hidden_states[-1])
    torch.testing.assert_close(after.logits[..., :base_size], before.logits, rtol=1e-6, atol=1e-6)
    assert korean.shape[-1] == embed.shape[0] and torch.isfinite(korean).all()
