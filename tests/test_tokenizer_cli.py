"""launch/extend_tokenizer.py end to end: extend, report, and --report-only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megakor import corpora
from megakor.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
LLAMA2 = REPO.parent / "shared/fixtures/tokenizers/llama2"


def _launcher():
    spec = importlib.util.spec_from_file_location("extend_tokenizer", REPO / "launch/extend_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extend_then_report_only(tmp_path, capsys):
    if not LLAMA2.exists():
        pytest.skip(f"{LLAMA2} is absent (shared fixtures not checked out)")
    try:
        paths = corpora.prepare_corpora()
    except corpora.CorpusUnavailable as exc:
        pytest.skip(f"offline corpora cannot be fetched here: {exc}")
    plain = tmp_path / "extra.txt"
    plain.write_text("대한민국 헌법 전문과 본문\n" * 3, encoding="utf-8")
    out, report = tmp_path / "tok", tmp_path / "fertility.json"
    main = _launcher().main
    main(["--base", str(LLAMA2), "--corpus", str(paths["ko.train"]), str(plain), "--new-tokens", "500",
          "--out", str(out), "--report", str(report)])
    printed = capsys.readouterr().out
    assert "added 500 tokens" in printed and "ko tokens / Hangul eojeol" in printed
    assert len(load_tokenizer(out)) == 32_500
    first = json.loads(report.read_text())
    assert first["extended"]["vocab_size"] == 32_500 and first["base"]["vocab_size"] == 32_000
    assert first["relative_change"]["ko_tokens_per_100_chars"] < -0.2  # measured -0.26 at 500 tokens
    assert first["relative_change"]["en_tokens_per_100_chars"] == 0.0

    main(["--base", str(LLAMA2), "--out", str(out), "--report-only", "--report", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text()) == first
    assert "added" not in capsys.readouterr().out
