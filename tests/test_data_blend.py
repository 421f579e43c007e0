"""Blending proportions, packing completeness, sample format and exact resume across restarts and a
change of data-parallel size."""

import json
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from megakor.data import blend
from megakor.data.blend import BatchIterator, BlendedDataset, PackedSource, SourceSpec, build_datasets, eval_batches
from megakor.data.indexed import IndexedWriter

EOS = 2


def write_source(prefix, docs, vocab=1000):
    w = IndexedWriter(prefix, vocab, EOS)
    for d in docs:
        w.add(list(d) + [EOS])
    w.finish()
    return str(prefix)


def random_docs(n, low, high, seed, max_len=40):
    """Documents whose token ids lie in [low, high), so a sample's source is readable from its ids."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=rng.integers(1, max_len)).tolist() for _ in range(n)]


def test_sample_format_on_a_hand_worked_example(tmp_path):
    # Stream: a b E | c E | d e f g E  (10 tokens), T = 4 -> 3 windows, the last padded.
    a, b, c, d, e, f, g = 10, 11, 12, 13, 14, 15, 16
    ds = PackedSource(write_source(tmp_path / "s", [[a, b], [c], [d, e, f, g]]), seq_len=4, shuffle=False)
    assert len(ds) == 3
    want = [
        ([a, b, EOS, c], [b, EOS, -100, EOS], [0, 1, 2, 0]),
        ([EOS, d, e, f], [-100, e, f, g], [0, 0, 1, 2]),  # the continued document restarts at 0
        ([g, EOS, EOS, EOS], [EOS, -100, -100, -100], [0, 1, 0, 1]),  # end-of-epoch padding: one segment
    ]
    for i, (ids, labels, pos) in enumerate(want):
        s = ds[i]
        assert s["input_ids"].tolist() == ids
        assert s["labels"].tolist() == labels
        assert s["position_ids"].tolist() == pos
        assert all(t.dtype == torch.int64 for t in s.values())
    batches = list(eval_batches(ds, 2))
    assert [b["input_ids"].shape for b in batches] == [(2, 4), (1, 4)]
    # Packing metadata over the flattened batch: documents [a b E] [c] | [E] [d e f] and [g E] [pad pad].
    assert batches[0]["cu_seqlens"].tolist() == [0, 3, 4, 5, 8] and batches[0]["max_seqlen"] == 3
    assert batches[0]["cu_seqlens"].dtype == torch.int32
    assert batches[1]["cu_seqlens"].tolist() == [0, 2, 4] and batches[1]["max_seqlen"] == 2


def test_packing_keeps_every_token_once_per_epoch(tmp_path):
    docs = random_docs(300, 3, 1000, seed=0, max_len=50)
    T = 16
    ds = PackedSource(write_source(tmp_path / "s", docs), seq_len=T, seed=7, shuffle=True)
    n_tokens = sum(len(d) + 1 for d in docs)
    S = len(ds)
    assert S == -(-n_tokens // T)
    want = Counter(t for d in docs for t in d + [EOS])
    want[EOS] += S * T - n_tokens  # the padding of the epoch's last window
    epochs = []
    for epoch in range(2):
        got = Counter()
        inputs = []
        for i in range(epoch * S, (epoch + 1) * S):
            sample = ds[i]
            ids, labels, pos = sample["input_ids"], sample["labels"], sample["position_ids"]
            got.update(ids.tolist())
            inputs.append(ids)
            # Never predict across a boundary: after each EOS the label is masked; elsewhere it is the next input.
            nxt = torch.cat([ids[1:], labels[-1:]])
            assert torch.equal(labels[ids != EOS], nxt[ids != EOS])
            assert bool((labels[ids == EOS] == -100).all())
            # position_ids restart at 0 at the sample start and right after every EOS; the epoch's padding
            # (the tail of its last window) is a single segment.
            real = ds.window(i)[2]
            ref = [0]
            for t in range(1, T):
                ref.append(0 if ids[t - 1] == EOS and real[t - 1] else ref[-1] + 1)
            assert pos.tolist() == ref
        assert got == want
        epochs.append(torch.stack(inputs))
    assert not torch.equal(epochs[0], epochs[1])  # each epoch has its own order


def test_eval_order_is_the_document_order(tmp_path):
    docs = random_docs(50, 3, 1000, seed=1)
    ds = PackedSource(write_source(tmp_path / "s", docs), seq_len=8, shuffle=False)
    stream = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()
    flat = [t for d in docs for t in d + [EOS]]
    assert stream[: len(flat)] == flat and set(stream[len(flat):]) <= {EOS}
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_blend_proportions_within_two_percent(tmp_path):
    ko = PackedSource(write_source(tmp_path / "ko", random_docs(400, 3, 500, seed=2)), 16, seed=3, name="ko")
    en = PackedSource(write_source(tmp_path / "en", random_docs(100, 500, 1000, seed=4)), 16, seed=3, name="en")
    mix = BlendedDataset([ko, en], [0.8, 0.2], seed=3)
    n = 10_000
    from_en = sum(int(mix[i]["input_ids"].max()) >= 500 for i in range(n))  # read from the tokens, not the index
    assert abs(from_en / n - 0.2) < 0.02
    # Three sources, odd weights: the counts track the weights closely over any long prefix.
    third = PackedSource(write_source(tmp_path / "x", random_docs(50, 3, 1000, seed=5)), 16, seed=3, name="x")
    mix3 = BlendedDataset([ko, en, third], [5, 3, 2], seed=1)
    counts = np.bincount([mix3.locate(i)[0] for i in range(5000)], minlength=3) / 5000
    assert np.abs(counts - [0.5, 0.3, 0.2]).max() < 0.02
    # Within a source the samples are visited in order 0, 1, 2, ... with no gaps or repeats.
    for s in range(3):
        within = [j for src, j in (mix3.locate(i) for i in range(5000)) if src == s]
        assert within == list(range(len(within)))


def global_batches(dataset, steps, micro, gbs, dp, consumed=0):
    """Each step's global batch, gathered from all dp ranks in rank order."""
    iters = [BatchIterator(dataset, micro, gbs, r, dp, consumed) for r in range(dp)]
    out = []
    for _ in range(steps):
        parts = []
        for it in iters:
            parts += [next(it) for _ in range(it.micro_steps)]
        out.append({k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "labels", "position_ids")})
    return out, iters


def test_resume_bit_identical_across_restart_and_dp_change(tmp_path):
    def make():
        ko = PackedSource(write_source(tmp_path / "ko", random_docs(200, 3, 500, seed=6)), 32, seed=11, name="ko", cache_dir=str(tmp_path / "c"))
        en = PackedSource(write_source(tmp_path / "en", random_docs(60, 500, 1000, seed=7)), 32, seed=11, name="en", cache_dir=str(tmp_path / "c"))
        return BlendedDataset([ko, en], [0.8, 0.2], seed=11)

    reference, _ = global_batches(make(), steps=8, micro=2, gbs=8, dp=2)
    # dp=2 for 3 steps, checkpoint, restart (fresh objects, cached indices) with dp=1.
    _, iters = global_batches(make(), steps=3, micro=2, gbs=8, dp=2)
    states = [it.state_dict() for it in iters]
    assert states == [{"consumed_samples": 24}] * 2
    resumed, _ = global_batches(make(), steps=5, micro=4, gbs=8, dp=1, consumed=states[0]["consumed_samples"])
    for a, b in zip(reference[3:], resumed):
        for k in a:
            assert torch.equal(a[k], b[k])
    # And back from 1 to 2 ranks via load_state_dict.
    it = BatchIterator(make(), 4, 8, 0, 1)
    for _ in range(2 * it.micro_steps):
        next(it)
    state = it.state_dict()
    ranks = [BatchIterator(make(), 2, 8, r, 2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    step2 = torch.cat([next(r)["input_ids"] for r in ranks for _ in range(r.micro_steps)])
    assert torch.equal(step2, reference[2]["input_ids"])
    assert len(list((tmp_path / "c" / "index").glob("*.ends.npy"))) >= 2  # orders were cached


def test_batch_iterator_rejects_bad_layout_and_mid_step_state(tmp_path):
    ds = PackedSource(write_source(tmp_path / "s", random_docs(20, 3, 100, seed=8)), 8, shuffle=True)
    with pytest.raises(ValueError, match="not a multiple"):
        BatchIterator(ds, 2, 6, 0, 2)
    it = BatchIterator(ds, 1, 4, 0, 2)
    next(it)
    with pytest.raises(RuntimeError, match="middle of a step"):
        it.state_dict()


def test_source_spec_from_dict():
    s = SourceSpec.from_dict({"path": "data/en/*.jsonl", "weight": 0.2, "lang": "en"})
    assert s.name == "en"  # derived from the path, glob dropped
    assert SourceSpec.from_dict({"path": "/x/ko_wiki.jsonl.zst"}).name == "ko_wiki"
    assert s.clean_config().min_hangul_ratio == 0.0
    assert SourceSpec.from_dict({"path": "ko.jsonl"}).clean_config().min_hangul_ratio == 0.2
    with pytest.raises(ValueError, match="unknown key"):
        SourceSpec.from_dict({"path": "a", "wieght": 1})
    with pytest.raises(ValueError, match="positive"):
        SourceSpec.from_dict({"path": "a", "weight": 0})
    with pytest.raises(ValueError, match="unknown cleaning option"):
        SourceSpec.from_dict({"path": "a", "cleaning": {"min_char": 3}})
    with pytest.raises(ValueError, match="needs a 'path'"):
        SourceSpec.from_dict({"weight": 1})


def test_build_datasets_preprocesses_raw_sources_once_under_a_lock(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["한국어 문장 english"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    ko_docs = [f"한국어 문서 {i}번은 서울과 부산 이야기를 담고 있습니다. 내용 {i * 13}" for i in range(30)]
    en_docs = [f"English replay document number {i} talks about rivers and mountains {i * 7}." for i in range(30)]
    for name, docs in (("ko.jsonl", ko_docs), ("en.jsonl", en_docs), ("ko_eval.jsonl", ko_docs[:5])):
        (tmp_path / name).write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")

    calls = []
    real = blend.preprocess

    def counting(*args, **kw):
        calls.append(args[2])
        return real(*args, **{**kw, "workers": 0})

    monkeypatch.setattr(blend, "preprocess", counting)
    sources = [{"path": str(tmp_path / "ko.jsonl"), "weight": 0.8, "dedup": False},
               {"path": str(tmp_path / "en.jsonl"), "weight": 0.2, "lang": "en", "dedup": False}]
    evals = [{"path": str(tmp_path / "ko_eval.jsonl"), "name": "ko_eval", "dedup": False}]
    results = []

    def build():
        results.append(build_datasets(sources, evals, str(tmp_path / "tokenizer.json"), 16, 1, str(tmp_path / "cache"), 0))

    threads = [threading.Thread(target=build) for _ in range(2)]  # two "ranks" at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and sorted(calls) == sorted(set(calls)) and len(calls) == 3
    train, evals_ds = results[0]
    assert train.names == ["ko", "en"] and list(evals_ds) == ["ko_eval"]
    assert train.sources[0].docs.num_tokens and len(train.sources[1].docs) == 30  # English kept: lang "en"
    for i in range(20):
        assert torch.equal(results[0][0][i]["input_ids"], results[1][0][i]["input_ids"])
    build_datasets(sources, evals, str(tmp_path / "tokenizer.json"), 16, 1, str(tmp_path / "cache"), 0)
    assert len(calls) == 3  # cached: not preprocessed again
    with pytest.raises(ValueError, match="set data.cache_dir"):
        build_datasets(sources, None, str(tmp_path / "tokenizer.json"), 16, 1, None, 0)
    with pytest.raises(ValueError, match="distinct 'name'"):
        build_datasets([sources[0], sources[0]], None, str(tmp_path / "tokenizer.json"), 16, 1, str(tmp_path / "cache"), 0)


def test_holdout_documents_split_train_and_eval_disjointly(tmp_path):
    docs = random_docs(60, 3, 1000, seed=9)
    prefix = write_source(tmp_path / "ko", docs)
    train, evals = build_datasets([{"path": prefix, "holdout_documents": 10}], None, None, 8, 5, str(tmp_path / "c"), 0)
    held = evals["ko"]
    stream = torch.cat([held[i]["input_ids"] for i in range(len(held))]).tolist()
    flat = [t for d in docs[50:] for t in d + [EOS]]
    assert stream[: len(flat)] == flat and set(stream[len(flat):]) <= {EOS}
    src = train.sources[0]
    got = Counter(t for i in range(len(src)) for t in src[i]["input_ids"].tolist())
    want = Counter(t for d in docs[:50] for t in d + [EOS])
    want[EOS] += len(src) * 8 - sum(len(d) + 1 for d in docs[:50])
    assert got == want  # one epoch of training sees exactly the first 50 documents
    with pytest.raises(ValueError, match="must be smaller"):
        build_datasets([{"path": prefix, "holdout_documents": 60}], None, None, 8, 5, None, 0)


def test_trainer_eval_split_reads_only_the_held_out_documents(tmp_path):
    from megakor.train.loop import eval_split

    docs = random_docs(60, 3, 1000, seed=9)
    prefix = write_source(tmp_path / "ko", docs)
    _, evals = build_datasets([{"path": prefix, "holdout_documents": 10}], None, None, 8, 5, str(tmp_path / "c"), 0)
    split = eval_split("ko", evals["ko"], 16, 0, None, None)
    assert split.documents == 10
    used = set(split.rows[:, 0].ravel().tolist()) - {0, EOS}  # minus padding and the chunk-start id
    held_out = {t for d in docs[50:] for t in d}
    assert used == held_out  # every held-out document is read, and nothing else
