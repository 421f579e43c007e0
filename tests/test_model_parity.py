"""megakor's model against transformers' on tiny random checkpoints of every supported family."""

from __future__ import annotations

import pytest
import torch
import transformers

from megakor.checkpoint.source import build_model

from conftest import FAMILIES


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(hf_checkpoints, family):
    path = hf_checkpoints[family]
    ref = _hf(path)
    model, _ = build_model(str(path))
    model.eval()
    # 48 tokens: past Mistral's sliding window (24) and the dynamic-RoPE context (32).
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_packed_documents_equal_separate_forwards(hf_checkpoints):
    model, _ = build_model(str(hf_checkpoints["llama3"]))
    model.eval()
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 300, (n,), generator=g) for n in (7, 12, 5)]
    ids = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, pos)[0]
        separate = torch.cat([model(d.unsqueeze(0))[0] for d in docs])
    assert (packed - separate).abs().max().item() < 1e-5
    # And without the document boundaries the later documents would differ: the test can fail.
    with torch.no_grad():
        unpacked = model(ids)[0]
    assert (unpacked[7:] - separate[7:]).abs().max().item() > 1e-3
