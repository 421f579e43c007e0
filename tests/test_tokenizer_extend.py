"""Vocabulary extension on the real Llama 3 (byte-level) and Llama 2 (byte-fallback) tokenizers,
learned on the offline Korean corpus and checked on its held-out split."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megakor import corpora
from megakor.tokenizer import load_tokenizer
from megakor.tokenizer import extend, fertility

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared/fixtures"
NEW_TOKENS = 8000
# The bar, on Hangul eojeols of held-out Korean text.
REQUIRED_DROP = {"llama2": 0.50, "llama3": 0.15}

NO_HANGUL = [
    "The quick brown fox jumps over the lazy dog.\n\n  def f(x):\n\treturn x ** 2  # square",
    "Ünïcödé café naïve — 東京タワー 北京 Здравствуй мир ١٢٣ 😀👍🏽",
    "Decomposed e\u0301 and precomposed é; NBSP\u00a0here; zero\u200bwidth; <|begin_of_text|> <s> </s>",
    "   leading spaces, trailing spaces   \n\n\n\nmany newlines\r\nCRLF",
    "℃ ※ ① ② ㎏ ㎞ 「」『』…· are symbols Korean text uses, none of them Hangul",
]
KOREAN = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "김프(GIMP) 2.10에서 새 레이어를 만들려면 Shift+Ctrl+N을 누르세요. 😀",
    "데비안 패키지는 apt-get install 명령으로 설치합니다.\n\n다음 절을 참조하십시오.",
    " 띄어쓰기가  두 번,\t탭과 줄바꿈\n이 섞인 글 ",
    "똠방각하 쀍 햏 (드문 음절들)",
]


@pytest.fixture(scope="module")
def texts():
    try:
        paths = corpora.prepare_corpora()
    except corpora.CorpusUnavailable as exc:
        pytest.skip(f"offline corpora cannot be fetched here: {exc}")
    return {name: corpora.read_texts([path]) for name, path in paths.items()}


@pytest.fixture(scope="module", params=["llama3", "llama2"])
def extended(request, texts, tmp_path_factory):
    base = FIXTURES / "tokenizers" / request.param
    if not (base / "tokenizer.json").exists():
        pytest.skip(f"{base} is absent (shared fixtures not checked out)")
    out = tmp_path_factory.mktemp(f"ext-{request.param}")
    extension = extend.extend_tokenizer(base, texts["ko.train"], NEW_TOKENS, out)
    # Loaded once here: Llama 3's files take seconds to parse on a busy CI core.
    return SimpleNamespace(name=request.param, base_dir=base, out=out, extension=extension,
                           base=Tokenizer.from_file(str(base / "tokenizer.json")),
                           new=Tokenizer.from_file(str(out / "tokenizer.json")),
                           hf_base=load_tokenizer(base), hf_new=load_tokenizer(out))


def test_new_ids_follow_the_whole_base_vocabulary(extended):
    name, base_dir, out, extension = extended.name, extended.base_dir, extended.out, extended.extension
    base, new = extended.base, extended.new
    base_vocab, new_vocab = base.get_vocab(True), new.get_vocab(True)
    base_size = {"llama3": 128_256, "llama2": 32_000}[name]
    assert extension.base_size == base_size == max(base_vocab.values()) + 1
    assert all(new_vocab[token] == index for token, index in base_vocab.items())
    added = sorted(index for token, index in new_vocab.items() if token not in base_vocab)
    assert added == list(range(base_size, base_size + len(extension.new_tokens)))
    # The small corpus runs out of pairs seen twice before 8,000 for Llama 3 (about 6,500).
    assert len(extension.new_tokens) >= {"llama3": 6000, "llama2": NEW_TOKENS}[name]
    assert all(extend.token_implies_hangul(t, extension.kind) for t in extension.new_tokens)

    # Through transformers as well, special tokens and all.
    hf_base, hf_new = extended.hf_base, extended.hf_new
    assert len(hf_new) == base_size + len(extension.new_tokens)
    assert (hf_new.bos_token_id, hf_new.eos_token_id) == (hf_base.bos_token_id, hf_base.eos_token_id)
    assert hf_new.all_special_ids == hf_base.all_special_ids
    for added_token in json.loads((base_dir / "tokenizer.json").read_text())["added_tokens"]:
        assert hf_new.convert_tokens_to_ids(added_token["content"]) == added_token["id"]
    assert json.loads((out / "tokenizer_config.json").read_text()) == \
        json.loads((base_dir / "tokenizer_config.json").read_text())


def test_text_without_hangul_encodes_exactly_as_before(extended, texts):
    base, new = extended.base, extended.new
    hangul = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
    samples = NO_HANGUL + texts["en.heldout"] + [hangul.sub("", t) for t in texts["ko.heldout"][:20]]
    assert not any(extend.contains_hangul(s) for s in samples)
    for add_special_tokens in (False, True):
        assert [e.ids for e in new.encode_batch(samples, add_special_tokens=add_special_tokens)] == \
            [e.ids for e in base.encode_batch(samples, add_special_tokens=add_special_tokens)]
    hf_base, hf_new = extended.hf_base, extended.hf_new
    assert hf_new(NO_HANGUL)["input_ids"] == hf_base(NO_HANGUL)["input_ids"]


def test_decode_encode_round_trips(extended, texts):
    new = extended.new
    samples = [unicodedata.normalize("NFC", s) for s in KOREAN + NO_HANGUL[:2]]
    samples += texts["ko.heldout"][:20] + texts["en.heldout"][:5]
    for sample in samples:
        ids = new.encode(sample, add_special_tokens=False).ids
        assert new.decode(ids, skip_special_tokens=False) == sample
    # The new tokens are what Korean text is written in now.
    base_size = extend.full_vocab_size(extended.base)
    assert any(i >= base_size for i in new.encode(KOREAN[0]).ids)


def test_fertility_drops_on_held_out_korean_and_english_is_unchanged(extended, texts):
    name = extended.name
    report = fertility.fertility_report(extended.base, extended.new, texts["ko.heldout"], texts["en.heldout"])
    print(f"\n{name} +{NEW_TOKENS}\n" + fertility.format_report(report))
    assert -report["relative_change"]["ko_hangul_tokens_per_eojeol"] >= REQUIRED_DROP[name]
    assert report["extended"]["en_tokens"] == report["base"]["en_tokens"]
    assert report["extended"]["ko_tokens"] < report["base"]["ko_tokens"]


def test_gpt2_style_byte_level_base_with_specials_first(texts, tmp_path):
    """SmolLM2's layout: GPT-2 pre-tokenizer (ByteLevel with its regex), special tokens at ids 0..2
    inside the BPE vocabulary, no added tokens after it. Trained here on English only."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts["en.train"][:100], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "extended"
    extension = extend.extend_tokenizer(tmp_path / "tokenizer.json", texts["ko.train"], 1000, out)
    assert extension.kind == extend.BYTE_LEVEL and extension.base_size == 1000
    assert len(extension.new_tokens) == 1000
    new = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [new.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert [e.ids for e in new.encode_batch(NO_HANGUL)] == [e.ids for e in tok.encode_batch(NO_HANGUL)]
    for sample in KOREAN:
        assert new.decode(new.encode(sample).ids) == sample
    assert len(new.encode(KOREAN[0]).ids) < len(tok.encode(KOREAN[0]).ids) / 2
    # No tokenizer_config.json in the base: one is written naming the well-known specials.
    assert load_tokenizer(out).eos_token == "<|endoftext|>"


def test_bytes_imply_hangul_against_brute_force():
    # For every 2-byte prefix of a 3-byte character: True exactly when every character it can
    # begin is Hangul (checked by enumerating them).
    for lead in range(0xE0, 0xF0):
        for second in range(0x80, 0xC0):
            prefix = bytes([lead, second])
            chars = []
            for third in range(0x80, 0xC0):
                try:
                    chars.append((prefix + bytes([third])).decode("utf-8"))
                except UnicodeDecodeError:
                    pass
            expected = bool(chars) and all(extend.is_hangul(c) for c in chars)
            assert extend.bytes_imply_hangul(prefix) == expected, prefix
            assert extend.bytes_imply_hangul(b"x" + prefix) == expected
    assert extend.bytes_imply_hangul("가".encode())
    assert extend.bytes_imply_hangul("a가".encode()[:2]) is False  # lead byte alone: could be anything
    assert extend.bytes_imply_hangul("가".encode()[1:]) is False  # a tail proves nothing
    assert extend.bytes_imply_hangul("é東a".encode()) is False
    assert extend.bytes_imply_hangul("가".encode()[1:] + "나".encode())


def test_ends_on_character_against_decoding():
    data = "a가é😀東\u0000힣".encode()
    for end in range(len(data) + 1):
        try:
            data[:end].decode("utf-8")
            complete = True
        except UnicodeDecodeError:
            complete = False
        assert extend._ends_on_character(data[:end]) == complete, end


def test_is_hangul_matches_unicode_names():
    for cp in range(0x110000):
        name = unicodedata.name(chr(cp), None)
        if name is not None:
            assert extend.is_hangul(chr(cp)) == ("HANGUL" in name or "KOREAN CHARACTER" in name), hex(cp)


def test_normalize_korean():
    nfd = unicodedata.normalize("NFD", "한국어")
    assert len(nfd) == 8 and extend.normalize_korean(nfd) == "한국어"
    assert extend.normalize_korean(" 가\u00a0\u00a0나\t\u200b다 \r\n\n\n\n 라 ") == "가 나 다\n\n라"


def test_bad_inputs_name_the_fix(tmp_path, texts):
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0, byte_fallback=False))
    unigram.save(str(tmp_path / "unigram.json"))
    with pytest.raises(ValueError, match="not BPE"):
        extend.train_extension(tmp_path / "unigram.json", ["가나다"], 10)
    llama2 = FIXTURES / "tokenizers/llama2"
    if not llama2.exists():
        pytest.skip(f"{llama2} is absent")
    with pytest.raises(ValueError, match="no Hangul words"):
        extend.train_extension(llama2, texts["en.heldout"], 10)
    with pytest.raises(ValueError, match="at least 1 new token"):
        extend.train_extension(llama2, ["가나다"], 0)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        extend.train_extension(tmp_path, ["가나다"], 10)
