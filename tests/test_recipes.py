"""Every recipe under configs/recipes/ loads and validates; mistakes are named."""

from __future__ import annotations

import pytest

from megakor.default_job import RECIPES, DefaultJob, Recipe, load_recipe, recipe_sources


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.description
    assert recipe.steps == 50, "arms compare at the default job's budget: 50 steps of 4 x 256 tokens"
    sources = recipe_sources(recipe, {"ko.train": "ko.jsonl", "en.train": "en.jsonl"}, "chat.jsonl")
    assert sum(s["weight"] for s in sources) == pytest.approx(1.0)


def test_plain_is_the_base_tokenizer_in_one_stage_and_default_is_a_recipe():
    plain, default = load_recipe("plain"), load_recipe("default")
    assert (plain.new_tokens, plain.stage1_steps) == (0, 0)
    assert (plain.english_share, plain.chat_share) == (default.english_share, default.chat_share)
    assert DefaultJob().resolved_recipe() == default
    assert DefaultJob(stage2_lr=1e-5).resolved_recipe().stage2_lr == 1e-5
    from megakor.config import parse_job_arguments

    job = parse_job_arguments(DefaultJob, ["--distill-replay", "false", "--frozen-layers", "8-21"], "")
    assert (job.resolved_recipe().distill_replay, job.resolved_recipe().frozen_layers) == (False, "8-21")
    with pytest.raises(SystemExit):
        parse_job_arguments(DefaultJob, ["--distill-replay", "maybe"], "")


def test_mistakes_are_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("new_tokens: 100\nstage_1_steps: 3\n")
    with pytest.raises(ValueError, match="unknown recipe keys \\['stage_1_steps'\\]"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="new_tokens=0 adds none"):
        Recipe(new_tokens=0, stage1_steps=5)
    with pytest.raises(ValueError, match="Korean keeps a share"):
        Recipe(english_share=0.5, chat_share=0.5)
    bad.write_text("stage2_lr: 5e-05\n")
    with pytest.raises(ValueError, match="stage2_lr='5e-05' is not a number"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="merge_keep=0 must be in \\(0, 1\\]"):
        Recipe(merge_keep=0)
    with pytest.raises(ValueError, match="init='zeros'"):
        Recipe(init="zeros")
    with pytest.raises(ValueError, match="distill_replay scores the replay sources, but english_share and chat_share are 0"):
        Recipe(distill_replay=True, english_share=0, chat_share=0)


def test_distill_replay_marks_only_the_replay_sources():
    sources = recipe_sources(load_recipe("distill_replay"), {"ko.train": "ko.jsonl", "en.train": "en.jsonl"}, "chat.jsonl")
    assert {s["name"]: s.get("distill", False) for s in sources} == {"ko": False, "en": True, "chat": True}
    plain = recipe_sources(load_recipe("plain"), {"ko.train": "ko.jsonl", "en.train": "en.jsonl"}, "chat.jsonl")
    assert not any(s.get("distill") for s in plain)
