"""The GIMP-manual translation task: pairs align by position and are verified, the split is by page, held-out
pages never reach the default job's Korean training text, and a held-out pair whose text also appears on a
training page is dropped. Synthetic manual pages stand in for the Debian packages (no download)."""

from __future__ import annotations

import json

from megakor import corpora
from megakor.tasks import translation
from megakor.tasks.heldout import is_translation_heldout_page


def _page(paragraphs: list[str]) -> str:
    return "<html><body>" + "".join(f"<p>{p}</p>" for p in paragraphs) + "</body></html>"


def _heldout_and_train_pages(n: int = 2):
    names = [f"page-{i}.html" for i in range(200)]
    held = [p for p in names if is_translation_heldout_page(p)]
    train = [p for p in names if not is_translation_heldout_page(p)]
    assert 0.03 < len(held) / len(names) < 0.2  # about TRANSLATION_HELDOUT_FRACTION
    return held[:n], train[:n]


def test_verify_pair_catches_misalignment():
    ok = ("그림 14.127. 자르기 도구를 사용하는 방법", "Figure 14.127. How to use the Crop tool")
    assert translation.verify_pair(*ok) is None
    assert translation.verify_pair("그림 14.128. 자르기 도구", "Figure 14.127. The Crop tool") == "numbers_differ"
    assert translation.verify_pair("The Crop tool is used", "The Crop tool is used") == "untranslated"
    assert translation.verify_pair("도구", "A very long English paragraph about the tool options") == "length_ratio"
    assert translation.verify_pair("참고", "Note") == "too_short"


def test_task_files_split_by_page_without_leaks(tmp_path, monkeypatch):
    (held,), (train_a, train_b) = _heldout_and_train_pages(1)[0], _heldout_and_train_pages(2)[1]
    pages = {
        train_a: (["자르기 도구는 이미지를 자를 때 씁니다.", "메뉴에서 도구를 선택하세요.", "Untranslated text stays English."],
                  ["The crop tool is used to crop an image.", "Select the tool from the menu.", "Untranslated text stays English."]),
        train_b: (["한 문단", "두 문단"], ["One paragraph only, which does not align."]),  # counts differ: dropped
        held: (["크기 고정 옵션을 켜면 비율이 유지됩니다.", "도구를 메뉴에서 고르세요."],
               ["Turning on the Fixed option keeps the ratio.", "Select the tool from the menu."]),
    }
    for lang, side in (("ko", 0), ("en", 1)):
        folder = tmp_path / lang
        folder.mkdir()
        for name, texts in pages.items():
            (folder / name).write_text(_page(texts[side]), encoding="utf-8")
    monkeypatch.setattr(translation, "_manual", lambda cache, lang: tmp_path / lang)
    report = translation.build_translation_task(tmp_path / "task", tmp_path / "cache")
    assert report["pairs"] == {"train": 2, "heldout": 1}
    assert report["dropped"]["page_paragraph_counts_differ"] == 1
    assert report["dropped"]["heldout_text_on_a_training_page"] == 1  # "Select the tool" is on a training page
    heldout = [json.loads(x) for x in (tmp_path / "task" / "heldout.ko-en.jsonl").read_text().splitlines()]
    assert [r["messages"][1]["content"] for r in heldout] == ["Turning on the Fixed option keeps the ratio."]
    en_ko = [json.loads(x) for x in (tmp_path / "task" / "heldout.en-ko.jsonl").read_text().splitlines()]
    assert en_ko[0]["messages"][0]["content"].endswith("Turning on the Fixed option keeps the ratio.")
    train = [json.loads(x) for x in (tmp_path / "task" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 4 and {r["direction"] for r in train} == {"ko-en", "en-ko"}
    assert all(held not in r["id"] for r in train)


def test_default_job_never_trains_on_heldout_translation_pages(monkeypatch, tmp_path):
    held, train = _heldout_and_train_pages(1)
    docs = [corpora.Document(f"gimp-help-ko/{held[0]}#0", "gimp-help-ko", "보류된 쪽"),
            corpora.Document(f"gimp-help-ko/{train[0]}#0", "gimp-help-ko", "학습하는 쪽")]
    monkeypatch.setattr(corpora, "_cached", lambda cache, name, build: docs)
    kept = corpora.gimp_help_ko_documents(tmp_path)
    assert [d.id for d in kept] == [f"gimp-help-ko/{train[0]}#0"]
