"""launch/preprocess.py end to end: exact token totals under --no-clean against the tokenizer itself,
parallel workers, resume after a crash, cleaning and dedup counts across files."""

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from megakor.data.indexed import IndexedDataset, dtype_for_vocab
from megakor.data.preprocess import PreprocessOptions, preprocess
from megakor.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared/fixtures"

SENTENCES = [
    "대한민국의 수도는 서울이다.", "한글은 1443년 세종대왕이 만들었다.", "부산은 항구 도시로 유명하다.",
    "제주도에는 한라산이 있다.", "김치는 한국의 전통 음식이다.", "경주는 신라의 옛 수도였다.",
    "한강은 서울을 가로질러 흐른다.", "설날에는 떡국을 먹는다.", "지하철 2호선은 순환선이다.",
    "가을에는 단풍이 아름답다.", "인천공항은 영종도에 있다.", "전주는 비빔밥으로 유명하다.",
]


def launch_main():
    spec = importlib.util.spec_from_file_location("launch_preprocess", REPO / "launch/preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def raw_docs(n, seed):
    """Korean documents as they arrive: NFD pieces, odd spaces, English, newlines, a tab."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.sample(SENTENCES, rng.randint(1, 6)))
        if i % 5 == 0:
            text = "  " + text.replace(" ", "\u3000", 1) + "\n\n"
        if i % 7 == 0:
            text += " Mixed English tail, 42%."
        if i % 11 == 0:
            text += " <|end_of_text|> 특수 토큰 <s></s> 글자"  # special-token text: tokenizers splits it out
        docs.append(f"{i}. {text}")
    return docs


def tokenizer_dir(name):
    path = FIXTURES / "tokenizers" / name
    if not path.is_dir():
        pytest.skip(f"tokenizer fixture {path} is absent (it ships in shared/fixtures)")
    return path


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_no_clean_token_totals_exact_with_two_workers(tmp_path, name):
    tok_dir = tokenizer_dir(name)
    docs_a, docs_b = raw_docs(120, 1), raw_docs(80, 2)
    for fname, docs in (("a.jsonl", docs_a), ("b.jsonl", docs_b)):
        with open(tmp_path / fname, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    prefix = tmp_path / "out" / "ko"
    report = launch_main()(["--input", str(tmp_path / "*.jsonl"), "--tokenizer", str(tok_dir), "--output-prefix", str(prefix),
                            "--workers", "2", "--no-clean", "--quiet", "--report", str(tmp_path / "r.json"),
                            "--shard-bytes", "4000"])
    tok = load_tokenizer(tok_dir)
    expected = [tok(d).input_ids + [tok.eos_token_id] for d in docs_a + docs_b]
    assert report["tokens"] == sum(len(e) for e in expected)
    assert report["documents"] == 200 and report["skipped"] == {}
    assert report["characters"] == sum(len(d) for d in docs_a + docs_b)
    assert json.loads((tmp_path / "r.json").read_text())["tokens"] == report["tokens"]
    ds = IndexedDataset(prefix)
    assert ds.dtype == dtype_for_vocab(len(tok)) == (np.uint16 if len(tok) <= 65536 else np.uint32)
    assert ds.eos_id == tok.eos_token_id
    assert np.array_equal(np.asarray(ds.tokens), np.concatenate([np.asarray(e) for e in expected]))
    assert report["shards"]["total"] >= 2  # really split across the two workers
    has_tiktoken = importlib.util.find_spec("tiktoken") is not None
    assert report["tokenizer_engine"] == ("tiktoken" if name == "llama3" and has_tiktoken else "tokenizers")
    assert not os.path.exists(str(prefix) + ".shards")


def test_fast_path_mismatch_redoes_shard_with_tokenizers(tmp_path):
    pytest.importorskip("tiktoken")
    from megakor.data.preprocess import _tokenizer_backend, _Worker, fast_path_supported
    from megakor.data.sources import Piece

    tok_json, eos, vocab = _tokenizer_backend(tokenizer_dir("llama3"))
    assert fast_path_supported(tok_json)
    docs = raw_docs(70, 5)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    size = (tmp_path / "a.jsonl").stat().st_size
    worker = _Worker(tok_json, eos, vocab, PreprocessOptions(clean=None), None, fast_path=True)
    worker.fast.suffix = [7]  # break the fast path: the 64th-document check must catch it
    (tmp_path / "w").mkdir()
    summary = worker.run(0, [(0, Piece(str(tmp_path / "a.jsonl"), "jsonl", None, 0, -1, size))], str(tmp_path / "w"))
    tok = load_tokenizer(tokenizer_dir("llama3"))
    expected = np.concatenate([np.asarray(tok(d).input_ids + [eos]) for d in docs])
    assert summary["tokens"] == len(expected)
    assert np.array_equal(np.fromfile(tmp_path / "w" / "00000.bin", dtype=np.uint32), expected)


def test_dtype_is_smallest_that_fits():
    assert dtype_for_vocab(256) == np.uint8
    assert dtype_for_vocab(257) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(128256) == np.uint32


def test_resume_redoes_only_unfinished_shards(tmp_path):
    tok_dir = tokenizer_dir("llama2")
    with open(tmp_path / "a.jsonl", "w", encoding="utf-8") as f:
        for d in raw_docs(150, 3):
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    opts = PreprocessOptions(shard_bytes=2000)
    prefix = str(tmp_path / "p")
    first = preprocess([str(tmp_path / "a.jsonl")], str(tok_dir), prefix, workers=0, options=opts, progress=False, keep_shards=True)
    full_bin = Path(prefix + ".bin").read_bytes()
    full_idx = Path(prefix + ".idx").read_bytes()
    n = first["shards"]["total"]
    assert n >= 4
    # Simulate a crash: shard 2 never finished, and nothing was merged.
    for suffix in (".bin", ".idx", ".json", ".skipped.log"):
        os.remove(prefix + suffix)
    os.remove(os.path.join(prefix + ".shards", "00002.json"))
    second = preprocess([str(tmp_path / "a.jsonl")], str(tok_dir), prefix, workers=0, options=opts, progress=False)
    assert second["shards"] == {"total": n, "reused": n - 1, "processed": 1}
    assert Path(prefix + ".bin").read_bytes() == full_bin
    assert Path(prefix + ".idx").read_bytes() == full_idx
    for key in ("documents", "tokens", "characters", "skipped", "cleaning", "dedup"):
        assert second[key] == first[key]
    # A finished prefix is not redone at all.
    third = preprocess([str(tmp_path / "a.jsonl")], str(tok_dir), prefix, workers=0, options=opts, progress=False)
    assert third["shards"] == second["shards"] and third["fingerprint"] == second["fingerprint"]


def test_cleaning_and_dedup_across_files_counted(tmp_path):
    tok_dir = tokenizer_dir("llama2")
    base = [random_korean(60, seed=i) for i in range(12)]
    words = base[3].split()
    near = " ".join(words[:30] + ["서울특별시"] + words[31:])  # a one-word edit of a long document
    file_a = base[:6]
    file_b = [
        base[0],  # exact duplicate of a document in the other file
        base[1].upper().replace(" ", "   "),  # exact after normalisation (spaces)
        near,
        unicodedata_nfd(base[4]),  # NFD form of a document in file a: exact after NFC
        "연락처 010-2345-6789, 메일 kim@example.com. " + base[7],
        "This English paragraph is a replay document and carries no Hangul at all, so the filter drops it.",
        "짧다",
    ] + base[8:]
    for fname, docs in (("a.jsonl", file_a), ("b.jsonl.gz", file_b)):
        import gzip

        data = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode()
        (tmp_path / fname).write_bytes(gzip.compress(data) if fname.endswith(".gz") else data)
    report = launch_main()(["--input", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz"), "--tokenizer", str(tok_dir),
                            "--output-prefix", str(tmp_path / "p"), "--workers", "0", "--quiet", "--near-dup-threshold", "0.7"])
    assert report["dedup"] == {"exact_duplicate": 3, "near_duplicate": 1}
    assert report["skipped"] == {"exact_duplicate": 3, "near_duplicate": 1, "low_hangul_ratio": 1, "too_short": 1}
    assert report["cleaning"]["pii_phone"] == 1 and report["cleaning"]["pii_email"] == 1
    assert report["cleaning"]["nfc"] == 1
    assert report["documents"] == 6 + 1 + 4  # file a, the masked one, base[8:]
    tok = load_tokenizer(tok_dir)
    ds = IndexedDataset(tmp_path / "p")
    texts = [tok.decode(ds[i][:-1], skip_special_tokens=True) for i in range(len(ds))]
    assert texts[6].startswith("연락처 [PHONE], 메일 [EMAIL]. ")
    log = (tmp_path / "p.skipped.log").read_text()
    assert f"near_duplicate\t{tmp_path / 'b.jsonl.gz'}:3" in log
    assert f"exact_duplicate\t{tmp_path / 'b.jsonl.gz'}:1" in log
    # The English replay source keeps the paragraph with the Hangul filter off.
    en = launch_main()(["--input", str(tmp_path / "b.jsonl.gz"), "--tokenizer", str(tok_dir), "--output-prefix", str(tmp_path / "en"),
                        "--workers", "0", "--quiet", "--min-hangul-ratio", "0"])
    assert "low_hangul_ratio" not in en["skipped"]


def random_korean(n_words, seed):
    """Words of random Hangul syllables: documents that share no more than chance shingles."""
    rng = random.Random(seed)
    return " ".join("".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(rng.randint(1, 4))) for _ in range(n_words)) + "."


def unicodedata_nfd(text):
    import unicodedata

    return unicodedata.normalize("NFD", text)


def test_changed_options_start_over(tmp_path):
    tok_dir = tokenizer_dir("llama2")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "가나다라 마바사 아자차카 타파하"}, ensure_ascii=False) + "\n", encoding="utf-8")
    prefix = str(tmp_path / "p")
    preprocess([str(tmp_path / "a.jsonl")], str(tok_dir), prefix, workers=0, progress=False, keep_shards=True,
               options=PreprocessOptions(clean=None))
    shutil.rmtree(prefix + ".shards", ignore_errors=True)
    r = preprocess([str(tmp_path / "a.jsonl")], str(tok_dir), prefix, workers=0, progress=False,
                   options=PreprocessOptions(text_field="body", clean=None))
    assert r["documents"] == 0 and r["skipped"] == {"missing_field": 1}
