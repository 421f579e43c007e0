"""The typed config: YAML + dotted overrides, typos and wrong types named, layouts checked up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from megakor.config import ConfigError, load_config, validate, validate_model_layout

from conftest import REPO


def test_overrides_are_yaml_typed(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 5\noptim:\n  lr: 1e-3\n")
    cfg = load_config(p, ["train.steps=7", "optim.betas=[0.9, 0.99]", "data.sources=[{path: a, weight: 0.8}]",
                          "model.activation_checkpointing=true"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.9, 0.99]
    assert cfg.data.sources == [{"path": "a", "weight": 0.8}] and cfg.model.activation_checkpointing is True


def test_typo_names_the_nearest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.setps'; did you mean 'train.steps'\?"):
        load_config(None, ["train.setps=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'\?"):
        load_config(None, ["trian.steps=3"])


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match=r"train.steps must be int, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"optim.schedule='linear' is not valid; use one of cosine, wsd, constant"):
        load_config(None, ["optim.schedule=linear"])


def test_counts_and_intervals_are_checked():
    with pytest.raises(ConfigError, match="logging.log_every must be at least 1"):
        load_config(None, ["logging.log_every=0"])
    with pytest.raises(ConfigError, match="checkpoint.keep must be 0 or more"):
        load_config(None, ["checkpoint.keep=-1"])
    with pytest.raises(ConfigError, match="parallel.offload_params needs parameter partitioning"):
        load_config(None, ["parallel.zero_stage=1", "parallel.offload_params=true"])


def test_impossible_layouts_fail_in_one_sentence():
    with pytest.raises(ConfigError, match="cannot be combined with parallel.pipeline=2"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=3"])
    cfg = load_config(None, ["parallel.tensor=3", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="parallel.tensor=3 does not divide num_attention_heads=32; use 1, 2, 4, 8"):
        validate_model_layout(cfg, 32, 8, 32)
    cfg = load_config(None, ["parallel.pipeline=4", "parallel.zero_stage=1"])
    with pytest.raises(ConfigError, match="parallel.pipeline=4 exceeds the model's 2 layers"):
        validate_model_layout(cfg, 4, 2, 2)
    cfg = load_config(None, ["train.global_batch=6", "train.micro_batch=2"])
    with pytest.raises(ConfigError, match="train.global_batch=6 is not divisible by train.micro_batch=2 × data-parallel size 2"):
        validate(cfg, world_size=2)


# Run configs; the recipes under configs/recipes/ are another schema, loaded by tests/test_recipes.py.
@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").rglob("*.yaml")
                                         if p.relative_to(REPO / "configs").parts[0] != "recipes"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path: Path):
    load_config(path)


def test_job_options_parse_to_the_dataclass_field_types():
    from megakor.config import parse_job_arguments
    from megakor.default_job import DefaultJob

    job = parse_job_arguments(DefaultJob, ["--stage1-steps", "2", "--stage2-lr", "1e-4", "--out", "x"], "")
    assert (job.stage1_steps, job.stage2_lr, job.out) == (2, 1e-4, "x")
    assert job.new_tokens is None  # "int | None": the recipe's value unless given
    with pytest.raises(SystemExit):
        parse_job_arguments(DefaultJob, ["--stage1-steps", "two"], "")
