"""Every input format and every kind of bad input, read and then preprocessed: each bad record is
counted under its reason and logged with file and line, and every good document lands."""

import gzip
import json
import random

import numpy as np
import pytest

from megakor.data.indexed import IndexedDataset
from megakor.data.preprocess import PreprocessOptions, preprocess
from megakor.data.sources import expand_inputs, line_offsets, plan_pieces, read_piece

SENTENCES = [
    "대한민국의 수도는 서울이다.", "한글은 세종대왕이 만들었다.", "부산은 항구 도시로 유명하다.",
    "제주도에는 한라산이 있다.", "김치는 한국의 전통 음식이다.", "경주는 신라의 옛 수도였다.",
    "한강은 서울을 가로질러 흐른다.", "설날에는 떡국을 먹는다.",
]


def korean_docs(n, seed=0):
    rng = random.Random(seed)
    return [f"{i}번 문서. " + " ".join(rng.sample(SENTENCES, 4)) for i in range(n)]


def tiny_tokenizer(dir_path):
    """A byte-level BPE with <s>/</s>, BOS added by its post-processor (like Llama 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 3 + ["hello world english text"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    dir_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(dir_path / "tokenizer.json"))
    return str(dir_path / "tokenizer.json")


def records(paths, **kw):
    files, _ = expand_inputs(paths)
    pieces = plan_pieces(files, kw.pop("piece_bytes", 1 << 20), kw.get("text_unit", "blank_line"))
    out, piece_lines = [], {}
    for j, piece in enumerate(pieces):
        counter = {}
        out.append([(r.text, r.line, r.reason) for r in read_piece(piece, **kw, counter=counter)])
        piece_lines[j] = counter.get("lines", 0)
    offsets = line_offsets(pieces, piece_lines)
    return [(t, line + off, r) for recs, off in zip(out, offsets) for t, line, r in recs]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)), encoding="utf-8")


def test_every_format_reads_the_same_documents(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = korean_docs(30)
    write_jsonl(tmp_path / "a.jsonl", docs)
    raw = (tmp_path / "a.jsonl").read_bytes()
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "d.json").write_text(json.dumps([{"body": d} for d in docs], ensure_ascii=False), encoding="utf-8")
    pq.write_table(pa.table({"text": docs}), tmp_path / "e.parquet", row_group_size=7)
    (tmp_path / "f.txt").write_text("\n\n".join(d.replace(". ", ".\n", 1) for d in docs) + "\n", encoding="utf-8")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "g_saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(tmp_path / "h_dict"))
    (tmp_path / "one").mkdir()
    for i, d in enumerate(docs[:3]):
        (tmp_path / "one" / f"{i}.txt").write_text(d + "\n", encoding="utf-8")

    want = [(d, i + 1, None) for i, d in enumerate(docs)]
    assert records([str(tmp_path / "a.jsonl")]) == want
    assert records([str(tmp_path / "a.jsonl")], piece_bytes=300) == want  # byte ranges, absolute lines
    assert records([str(tmp_path / "b.jsonl.gz")]) == want
    assert records([str(tmp_path / "c.jsonl.zst")]) == want
    assert records([str(tmp_path / "d.json")], text_field="body") == want  # JSON array: item numbers
    assert records([str(tmp_path / "e.parquet")], piece_bytes=100) == want  # row groups across pieces
    assert records([str(tmp_path / "g_saved")], piece_bytes=500) == want
    assert records([str(tmp_path / "h_dict")]) == want
    text_docs = [d.replace(". ", ".\n", 1) + "\n" for d in docs]
    assert [(t, r) for t, _, r in records([str(tmp_path / "f.txt")], piece_bytes=200)] == [(t, None) for t in text_docs]
    assert [ln for _, ln, _ in records([str(tmp_path / "f.txt")], piece_bytes=200)] == [3 * i + 1 for i in range(30)]
    assert records([str(tmp_path / "one")], text_unit="file") == [(d + "\n", 1, None) for d in docs[:3]]
    assert records([str(tmp_path / "[ab].jsonl*")]) == want + want  # a glob, sorted
    files, unsupported = expand_inputs([str(tmp_path)])
    assert len(files) == 11 and unsupported == []  # 6 files, 2 saved datasets, 3 texts in one/
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs([str(tmp_path / "nope*.jsonl")])
    with pytest.raises(ValueError, match="set text_field"):
        records([str(tmp_path / "e.parquet")], text_field="content")


def test_bad_inputs_counted_logged_and_good_documents_kept(tmp_path):
    tok_path = tiny_tokenizer(tmp_path / "tok")
    good = korean_docs(40, seed=1)
    lines = [json.dumps({"text": d}, ensure_ascii=False).encode() for d in good]
    bad = {  # 1-based line -> (raw line, reason)
        5: (b'{"text": "\xeb\x8c\x80 \xff\xfe broken"}', "invalid_utf8"),
        9: (b'{"text": "unterminated', "malformed_json"),
        14: (b'{"body": "no text field"}', "missing_field"),
        20: (b'{"text": "   "}', "empty"),
        27: (b'{"text": ' + json.dumps("가" * ((50 << 20) // 3 + 1), ensure_ascii=False).encode() + b"}", "too_long"),  # ~50 MB
    }
    for line_no in sorted(bad):
        lines.insert(line_no - 1, bad[line_no][0])
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # A truncated .gz: the documents before the cut land, the cut is counted once.
    gz = gzip.compress(("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in good[:20])).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) * 2 // 3])
    opts = PreprocessOptions(clean=None, shard_bytes=4096)
    report = preprocess([str(tmp_path / "mixed.jsonl"), str(tmp_path / "cut.jsonl.gz")], tok_path, str(tmp_path / "out" / "p"),
                        workers=0, options=opts, progress=False)

    with gzip.open(tmp_path / "cut.jsonl.gz", "rt", encoding="utf-8") as f:
        survived = []
        try:
            for line in f:
                survived.append(json.loads(line)["text"])
        except (EOFError, ValueError):
            pass
    assert 0 < len(survived) < 20
    assert report["skipped"] == {"invalid_utf8": 1, "malformed_json": 1, "missing_field": 1, "empty": 1, "too_long": 1, "truncated_file": 1}
    assert report["documents"] == len(good) + len(survived)
    assert report["records"] == report["documents"] + sum(report["skipped"].values())

    log_lines = (tmp_path / "out" / "p.skipped.log").read_text().splitlines()[1:]
    logged = {(ln.split("\t")[0], ln.split("\t")[1]) for ln in log_lines}
    for line_no, (_, reason) in bad.items():
        assert (reason, f"{tmp_path / 'mixed.jsonl'}:{line_no}") in logged
    assert any(r == "truncated_file" and w.startswith(str(tmp_path / "cut.jsonl.gz")) for r, w in logged)

    from megakor.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_path)
    ds = IndexedDataset(tmp_path / "out" / "p")
    got = [ds[i].tolist() for i in range(len(ds))]
    assert got == [tok(d).input_ids + [tok.eos_token_id] for d in good + survived]
    assert ds.dtype == np.uint16  # 400-token vocabulary


def test_unsupported_files_reported_not_silent(tmp_path):
    tok_path = tiny_tokenizer(tmp_path / "tok")
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", korean_docs(3))
    (tmp_path / "in" / "notes.docx").write_bytes(b"PK\x03\x04")
    report = preprocess([str(tmp_path / "in")], tok_path, str(tmp_path / "p"), workers=0, progress=False,
                        options=PreprocessOptions(clean=None))
    assert report["documents"] == 3
    assert report["unsupported_files"] == [str(tmp_path / "in" / "notes.docx")]
