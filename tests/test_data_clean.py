"""Cleaning rules, PII patterns and dedup on Korean examples written for these tests."""

import unicodedata

import numpy as np
import pytest

from megakor.data.clean import CleanConfig, Cleaner, hangul_ratio, repeated_line_ratio, repeated_ngram_ratio, symbol_digit_ratio
from megakor.data.dedup import Deduplicator, MinHasher, exact_key

KO = "서울은 대한민국의 수도이며 한강이 도시를 가로질러 흐른다. 인구는 약 구백만 명이다."

# Every filter off, so a rewriting rule can be checked on its own.
NO_FILTERS = dict(min_chars=0, max_symbol_digit_ratio=1.0, max_repeated_line_ratio=1.0, max_repeated_ngram_ratio=1.0)


def only(**on):
    """A Cleaner with exactly the named rewriting rules on and no filters."""
    rules = dict(nfc=False, remove_invisible=False, strip_html=False, normalize_whitespace=False, mask_pii=False)
    rules.update(on)
    return Cleaner(CleanConfig(**rules, **NO_FILTERS))


def test_nfc_composes_decomposed_jamo():
    nfd = unicodedata.normalize("NFD", KO)
    assert len(nfd) > len(KO)  # the test input really is decomposed
    c = only(nfc=True)
    assert c(nfd) == (KO, None)
    assert c(KO) == (KO, None)
    assert c.counts["nfc"] == 1
    assert only()(nfd)[0] == nfd  # switched off: untouched


def test_invisible_characters_removed():
    c = only(remove_invisible=True)
    assert c("안\u200b녕\ufeff하세\u00ad요\x07 세\u200d계") == ("안녕하세요 세계", None)
    assert c("줄\n바꿈\t탭") == ("줄\n바꿈\t탭", None)  # newline and tab are kept
    assert c.counts["invisible_chars"] == 1


def test_html_remnants_removed_but_text_angle_brackets_kept():
    c = only(strip_html=True, normalize_whitespace=True)
    text, _ = c('<div class="x"><p>서울은 <b>대한민국</b>의 수도&amp;중심</p><script>var a = 1;</script><!-- 광고 --></div>')
    assert text == "서울은 대한민국 의 수도&중심"
    assert c("가격 비교: a < b 이고 <표 1> 참조") == ("가격 비교: a < b 이고 <표 1> 참조", None)
    assert c.counts["html"] == 1


def test_whitespace_normalised():
    c = only(normalize_whitespace=True)
    assert c("  가\u3000\u3000나\u00a0  다\r\n\n\n\n라 \n") == ("가 나 다\n\n라", None)
    assert c.counts["whitespace"] == 1


@pytest.mark.parametrize(
    "text,kind,expected",
    [
        ("문의는 hong.gildong+ko@example.co.kr 로 보내 주세요.", "email", "문의는 [EMAIL] 로 보내 주세요."),
        ("휴대폰 010-1234-5678, 사무실 02-123-4567.", "phone", "휴대폰 [PHONE], 사무실 [PHONE]."),
        ("해외에서는 +82 10-9876-5432 로 전화.", "phone", "해외에서는 [PHONE] 로 전화."),
        ("지역번호 031.765.4321 입니다", "phone", "지역번호 [PHONE] 입니다"),
        ("주민등록번호 900101-1234567 유출", "rrn", "주민등록번호 [RRN] 유출"),
        ("외국인등록번호 0112315123456 확인", "rrn", "외국인등록번호 [RRN] 확인"),
        ("카드 4111 1111 1111 1111 결제", "card", "카드 [CARD] 결제"),
        ("카드 5500-0000-0000-0004 승인", "card", "카드 [CARD] 승인"),
    ],
)
def test_pii_masked_with_typed_placeholder(text, kind, expected):
    c = only(mask_pii=True)
    assert c(text) == (expected, None)
    assert c.counts[f"pii_{kind}"] == expected.count(f"[{'RRN' if kind == 'rrn' else kind.upper()}]")


@pytest.mark.parametrize(
    "text",
    [
        "주문번호 4111 1111 1111 1112 는 카드가 아님",  # fails the Luhn check
        "날짜 2024-01-15 와 금액 1,234,567원",
        "확률 0.8444218515250481 과 991301-1234567",  # month 13: not a registration number
        "우편번호 04524, 버전 10.1234.5678",
    ],
)
def test_pii_patterns_leave_lookalikes_alone(text):
    c = only(mask_pii=True)
    assert c(text) == (text, None)
    assert sum(v for k, v in c.counts.items() if k.startswith("pii_")) == 0


def test_ratios_against_hand_counts():
    assert hangul_ratio("한국어 abc 123") == pytest.approx(3 / 6)
    assert symbol_digit_ratio("가나 12!?") == pytest.approx(4 / 6)
    assert repeated_line_ratio("가\n나\n가\n가\n\n") == pytest.approx(2 / 4)
    words = "가 나 다 가 나 다 라"  # 3-grams: 가나다 나다가 다가나 가나다(dup) 나다라 -> 1/5
    assert repeated_ngram_ratio(words, 3) == pytest.approx(1 / 5)


@pytest.mark.parametrize(
    "reason,text,config",
    [
        ("too_short", "짧은 글", dict(min_chars=20)),
        ("low_hangul_ratio", "This is an English sentence that has nothing Korean in it at all.", dict(min_hangul_ratio=0.2)),
        ("high_symbol_digit_ratio", "가격표 1234 5678 9012 ### $$$ %%% 3456 7890 !!! ???", dict(max_symbol_digit_ratio=0.5)),
        ("repeated_lines", "광고 문구입니다\n광고 문구입니다\n광고 문구입니다\n본문 한 줄", dict(max_repeated_line_ratio=0.3)),
        ("repeated_ngrams", "지금 바로 구매 지금 바로 구매 지금 바로 구매 지금 바로 구매 하세요", dict(max_repeated_ngram_ratio=0.3)),
    ],
)
def test_each_filter_drops_and_counts_its_reason(reason, text, config):
    base = dict(min_chars=0, min_hangul_ratio=0.0, max_symbol_digit_ratio=1.0, max_repeated_line_ratio=1.0, max_repeated_ngram_ratio=1.0)
    assert Cleaner(CleanConfig(**{**base, **config}))(text) == (None, reason)
    kept, why = Cleaner(CleanConfig(**base))(text)  # the same text passes with the filter off
    assert why is None and kept


def test_english_replay_kept_when_hangul_filter_off_and_korean_kept_on():
    en = "The quick brown fox jumps over the lazy dog near the river bank today."
    assert Cleaner(CleanConfig(min_hangul_ratio=0.0))(en)[1] is None
    assert Cleaner(CleanConfig(min_hangul_ratio=0.2))(en)[1] == "low_hangul_ratio"
    assert Cleaner(CleanConfig(min_hangul_ratio=0.2))(KO) == (KO, None)


def test_clean_config_rejects_unknown_and_out_of_range_options():
    with pytest.raises(ValueError, match="unknown cleaning option"):
        CleanConfig.from_dict({"min_hangle_ratio": 0.1})
    with pytest.raises(ValueError, match="outside"):
        CleanConfig(min_hangul_ratio=1.5)


LONG_KO = (
    "한국어 위키백과는 누구나 자유롭게 편집할 수 있는 온라인 백과사전이다. 많은 기여자들이 역사, 과학, 문화, "
    "스포츠 등 다양한 분야의 문서를 작성하고 고친다. 문서는 중립적 관점에서 작성되어야 하며 신뢰할 수 있는 "
    "출처를 인용해야 한다. 새로운 기여자는 사랑방에서 질문을 하고 도움을 받을 수 있다."
)


def test_exact_and_near_duplicates():
    hasher = MinHasher(64)
    near = LONG_KO.replace("스포츠", "음악")  # one word of ~40 changed
    other = "부산은 대한민국 남동부에 있는 항구 도시로, 해운대 해수욕장과 자갈치 시장으로 유명하다. " * 2
    docs = [LONG_KO, "  " + LONG_KO.replace(" ", "  ") + " ", near, other]
    dedup = Deduplicator(threshold=0.7, num_perm=64)
    verdicts = [dedup.check(exact_key(d), hasher.signature(d)) for d in docs]
    assert verdicts == [None, "exact_duplicate", "near_duplicate", None]
    assert dedup.counts == {"exact_duplicate": 1, "near_duplicate": 1}
    # Estimated Jaccard of the near duplicate is what decides; a stricter threshold keeps it.
    est = np.mean(hasher.signature(LONG_KO) == hasher.signature(near))
    assert 0.7 <= est < 0.99
    strict = Deduplicator(threshold=0.99, num_perm=64)
    assert [strict.check(exact_key(d), hasher.signature(d)) for d in docs] == [None, "exact_duplicate", None, None]
    only_exact = Deduplicator(exact=True, near=False)
    assert [only_exact.check(exact_key(d), None) for d in docs] == [None, "exact_duplicate", None, None]
