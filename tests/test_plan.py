"""The memory planner: model states equal DeepSpeed's own estimators, activations a hand count, and the
recipes' documented memory equals what launch/plan.py prints."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from megakor import plan
from megakor.config import load_config
from megakor.data.blend import SourceSpec
from megakor.model.args import preset, replace
from megakor.model.llama import Llama
from megakor.model.pipeline import layer_specs

from conftest import REPO

RECIPES = ["configs/runs/llama3.1_8b_korean.yaml", "configs/runs/llama3.1_70b_pipeline.yaml"]


def _launch_plan():
    spec = importlib.util.spec_from_file_location("launch_plan", REPO / "launch" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_states(overrides, nodes=4, gpus_per_node=8, arch="llama3.1-8b"):
    cfg = load_config(None, [f"model.init_from={arch}", "train.global_batch=64", *overrides])
    (stage,) = plan.plan(cfg, preset(arch), nodes, gpus_per_node).stages
    return stage.by_kind()[plan.STATES]


# ---- model states against DeepSpeed ----------------------------------------------------------------

@pytest.mark.parametrize("offload_optimizer,offload_params", [(False, False), (True, False), (True, True)])
def test_zero3_equals_deepspeed_estimator(offload_optimizer, offload_params):
    args = preset("llama3.1-8b")
    ours = _model_states(["parallel.zero_stage=3", f"parallel.offload_optimizer={offload_optimizer}",
                          f"parallel.offload_params={offload_params}"])
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=args.num_parameters(), largest_layer_params=args.vocab_size * args.hidden_size,
        num_gpus_per_node=8, num_nodes=4, cpu_offload=offload_optimizer, cpu_offload_params=offload_params,
        zero_init=True, additional_buffer_factor=1.5)
    assert ours == gpu


@pytest.mark.parametrize("offload", [False, True])
def test_zero2_equals_deepspeed_estimator(offload):
    args = preset("llama3.1-8b")
    ours = _model_states(["parallel.zero_stage=2", f"parallel.offload_optimizer={offload}"])
    _, gpu = estimate_zero2_model_states_mem_needs(total_params=args.num_parameters(), num_gpus_per_node=8,
                                                   num_nodes=4, cpu_offload=offload, additional_buffer_factor=1.5)
    assert ours == gpu


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_tensor_parallel_rank_equals_deepspeed_on_its_share(zero_stage):
    """TP=2 on 4 × 8 GPUs: each rank holds half of every matrix (norms whole) and ZeRO shards over DP 16."""
    a = preset("llama3.1-8b")
    d, hd = a.hidden_size, a.head_dim
    per_layer = d * hd * (2 * a.num_heads + 2 * a.num_kv_heads) // 2 + 3 * d * a.intermediate_size // 2 + 2 * d
    embedding_half = a.vocab_size * d // 2  # 128,256 is already a multiple of 128 × 2: no padding
    rank_params = a.num_layers * per_layer + d + 2 * embedding_half
    ours = _model_states(["parallel.tensor=2", f"parallel.zero_stage={zero_stage}"])
    if zero_stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(rank_params, embedding_half, num_gpus_per_node=16,
                                                          num_nodes=1, cpu_offload=False, cpu_offload_params=False)
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(rank_params, num_gpus_per_node=16, num_nodes=1,
                                                       cpu_offload=False)
    assert ours == gpu


def test_zero1_and_zero0_bytes_per_parameter():
    n = 1_000_000
    assert sum(plan.model_states(n, 1, dp=4).values()) == 2 * n + 2 * n + 16 * n // 4
    assert sum(plan.model_states(n, 0, dp=4).values()) == 20 * n


@pytest.mark.parametrize("bias", [False, True])
def test_rank_parameter_counts_match_the_model(bias):
    # vocab 500 is padded to 512 rows, as the model's embedding and head are.
    args = replace(preset("debug"), vocab_size=500, attention_bias=bias, o_bias=bias, mlp_bias=bias)
    model = Llama(args)
    counts = dict(plan.spec_parameters(args, 1))
    assert counts["embedding"] == model.tok_embeddings.weight.numel()
    assert counts["head"] == model.lm_head.weight.numel()
    assert counts["norm"] == model.norm.weight.numel()
    assert counts["layer 0"] == sum(p.numel() for p in model.layers["0"].parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert plan.largest_layer_parameters(args, 1) == largest  # DeepSpeed's definition (all_live estimator)
    # The weights DeepSpeed's "parameters" partitioner balances: each pipeline layer spec's parameters.
    built = [sum(p.numel() for p in spec.build().parameters()) for spec in layer_specs(args)]
    assert [n for _, n in plan.spec_parameters(args, 1)] == built


def test_tied_head_is_one_parameter_and_still_has_its_loss_buffers():
    cfg = load_config(None, ["model.init_from=smollm2-135m", "train.global_batch=8"])
    (stage,) = plan.plan(cfg, preset("smollm2-135m"), nodes=1, gpus_per_node=2).stages
    assert stage.parameters == preset("smollm2-135m").num_parameters()
    assert stage.by_kind()[plan.LOSS] > 0


def test_a_distilled_source_adds_the_frozen_start_in_bf16_and_its_logits_chunk():
    args = preset("smollm2-135m")
    common = ["model.init_from=smollm2-135m", "train.global_batch=8", "train.micro_batch=2", "train.seq_len=1024"]
    (plain,) = plan.plan(load_config(None, [*common, "data.sources=[{path: x}, {path: y}]"]), args, 1, 2).stages
    (distilled,) = plan.plan(load_config(None, [*common, "data.sources=[{path: x}, {path: y, distill: true}]"]),
                             args, 1, 2).stages
    extra = {c.name: c.bytes for c in distilled.components}
    rows = plan.padded_vocab_size(args.vocab_size, 1)
    assert extra["distillation teacher (the frozen start)"] == args.num_parameters() * 2
    assert extra["KL: fp32 copies of both heads"] == 2 * rows * args.hidden_size * 4
    assert extra["KL: logits chunk"] == 1024 * rows * 4 * 3
    assert extra["LM-head gradients held by the KL"] == plan.head_gradient_bytes(args, 1, 2 * 1024)
    assert distilled.total - plain.total == sum(extra[k] for k in (
        "distillation teacher (the frozen start)", "KL: fp32 copies of both heads", "KL: logits chunk",
        "LM-head gradients held by the KL"))


# ---- activations, by hand --------------------------------------------------------------------------

def test_activations_hand_count_debug_model():
    # debug: h=64, 4 query / 2 KV heads of 16, SwiGLU width 176. Bytes per token of one block, TP 1:
    # norm inputs 2·(2·64) + norm outputs 2·(2·64) + 1/rms 2·4 = 520; q 2·64 = 128; k, v 2·32 = 64 each;
    # cos+sin 2·2·16 = 64; attention output 128; lse 4·4 = 16; gate, up, product 3·2·176 = 1056 → 2040.
    args = preset("debug")
    assert plan.layer_activation_bytes_per_token(args, 1) == 2040
    # TP 2 splits all but the 520 and the 64 of cos/sin: 520 + 64 + (128 + 64 + 64 + 128 + 16 + 1056) / 2 = 1312.
    assert plan.layer_activation_bytes_per_token(args, 2) == 1312
    # 32 tokens, 2 blocks, + the stage output 2·64 per token: 32 · (2·2040 + 128) = 134,656 bytes.
    assert plan.activation_bytes(args, 1, tokens=32, layers=2, in_flight=1, checkpointing=False) == 134_656
    # Checkpointed: 32 · (2 block inputs · 128 + 128 + one recomputed block 2040) = 77,568 bytes.
    assert plan.activation_bytes(args, 1, tokens=32, layers=2, in_flight=1, checkpointing=True) == 77_568
    # Loss chunk: min(64, 32) tokens × 512 rows × 4 B × 2 = 131,072 bytes.
    assert plan.loss_chunk_bytes(args, 1, tokens=32, chunk_tokens=64) == 131_072


def test_pipeline_stage_zero_holds_micro_batches_in_flight():
    # debug over PP 2 on 2 GPUs (DP 1), GAS 4: DeepSpeed balances parameters as [embedding, layer 0] |
    # [layer 1, norm, head]; 1F1B keeps min(PP, GAS) = 2 micro-batches alive on stage 0, 1 on stage 1.
    cfg = load_config("configs/runs/tiny_cpu.yaml", ["parallel.pipeline=2", "parallel.zero_stage=1"])
    p = plan.plan(cfg, preset("debug"), nodes=1, gpus_per_node=2)
    first, last = p.stages
    assert (first.specs, first.in_flight, last.specs, last.in_flight) == ("embedding + layer 0", 2,
                                                                          "layer 1 + norm + head", 1)
    assert first.by_kind()[plan.ACTIVATIONS] == 2 * 32 * (2040 + 128)
    assert plan.LOSS not in first.by_kind() and last.by_kind()[plan.LOSS] > 0


# ---- the CLI and the recipes -------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_documents_what_plan_prints(recipe, tmp_path, capsys):
    text = (REPO / recipe).read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    argv = shlex.split(re.search(r"python launch/plan\.py (.+)", header).group(1))
    assert argv[0] == recipe and "--arch" in argv
    assert _launch_plan().main([str(REPO / argv[0]), *argv[1:], "--json", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "p.json").read_text())

    documented = re.search(r"expected memory per GPU: ([\d.]+) GiB of (\d+)[^(]*\(([^)]*)\)", header)
    total, gpu, parts = documented.groups()
    assert total == f"{result['total_gib']:.2f}", f"{recipe}: header says {total} GiB; plan.py prints:\n{printed}"
    assert re.search(rf"^total\s+{re.escape(total)}\s", printed, re.M)
    assert float(gpu) == result["gpu_memory_gib"] and result["verdict"].startswith("fits")
    for part in parts.split(", "):
        kind, value = part.rsplit(" ", 1)
        assert value == f"{result['by_kind_bytes'][kind] / plan.GIB:.2f}", f"{recipe}: '{part}' is stale"
    last = re.search(r"last stage ([\d.]+) GiB", header)
    if last:
        assert last.group(1) == f"{result['stages'][-1]['total_gib']:.2f}"

    cfg = load_config(REPO / recipe)
    sources = [SourceSpec.from_dict(s) for s in cfg.data.sources]
    assert [(s.weight, s.lang) for s in sources] == [(0.8, "ko"), (0.2, "en")]
    assert cfg.optim.schedule == "wsd" and cfg.model.activation_checkpointing and cfg.tokenizer.path
    assert 3.5e6 <= cfg.train.global_batch * cfg.train.seq_len <= 4.5e6


def test_missing_checkpoint_without_arch_is_one_sentence(capsys):
    assert _launch_plan().main([str(REPO / RECIPES[0]), "--nodes", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--arch" in err and "/data/models/Meta-Llama-3.1-8B" in err

