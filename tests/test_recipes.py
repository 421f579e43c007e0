"""Every recipe under configs/recipes/ loads and validates; mistakes are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megakor.default_job import RECIPES, DefaultJob, Recipe, load_recipe, recipe_sources


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.description
    assert recipe.steps == 50, "arms compare at the default job's budget: 50 steps of 4 x 256 tokens"
    sources = recipe_sources(recipe, {"ko.train": "ko.jsonl", "en.train": "en.jsonl"}, "chat.jsonl")
    assert sum(s["weight"] for s in sources) == pytest.approx(1.0)


@pytest.mark.parametrize("path", sorted((RECIPES / "long").glob("*.yaml")), ids=lambda p: p.stem)
def test_long_recipes_are_their_namesakes_at_six_times_the_budget(path):
    """configs/recipes/long/<arm>.yaml is configs/recipes/<arm>.yaml with only its steps (and words) changed."""
    long, short = load_recipe(path), load_recipe(path.stem)
    assert long.steps == 6 * short.steps == 300
    assert {**long.__dict__, "stage2_steps": 0, "description": ""} == {**short.__dict__, "stage2_steps": 0, "description": ""}


def test_plain_is_the_base_tokenizer_in_one_stage_and_default_is_a_recipe():
    plain, default, same = load_recipe("plain"), load_recipe("default"), load_recipe("plain_ko85")
    for p in (plain, same):
        assert (p.new_tokens, p.stage1_steps, p.distill_replay, p.stage2_lr) == (0, 0, False, 2e-4)
    # The bench's baseline replays 30% as text; plain_ko85 is plain CPT on the default's own mixture.
    assert (plain.english_share, plain.chat_share) == (0.1, 0.2)
    assert (same.english_share, same.chat_share) == (default.english_share, default.chat_share)
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
    with pytest.raises(ValueError, match="this recipe distills no chat replay"):
        Recipe(distill_english=False)  # distill_replay is off: nothing would be distilled
    with pytest.raises(ValueError, match="this recipe distills no chat replay"):
        Recipe(distill_replay=True, distill_english=False, chat_share=0)
    with pytest.raises(ValueError, match="distill_english='no'; write true or false"):
        Recipe(distill_replay=True, distill_english="no")


def test_distill_replay_marks_only_the_replay_sources():
    sources = recipe_sources(load_recipe("distill_replay"), {"ko.train": "ko.jsonl", "en.train": "en.jsonl"}, "chat.jsonl")
    assert {s["name"]: s.get("distill", False) for s in sources} == {"ko": False, "en": True, "chat": True}
    plain = recipe_sources(load_recipe("plain"), {"ko.train": "ko.jsonl", "en.train": "en.jsonl"}, "chat.jsonl")
    assert not any(s.get("distill") for s in plain)


def test_distill_english_false_keeps_the_english_prose_as_text():
    corpora = {"ko.train": "ko.jsonl", "en.train": "en.jsonl"}
    sources = recipe_sources(load_recipe("distill_chat_lr_1.5e-4"), corpora, "chat.jsonl")
    assert {s["name"]: s.get("distill", False) for s in sources} == {"ko": False, "en": False, "chat": True}
    from megakor.config import parse_job_arguments

    job = parse_job_arguments(DefaultJob, ["--recipe", "distill_replay", "--distill-english", "false"], "")
    assert job.resolved_recipe() == Recipe(**{**load_recipe("distill_replay").__dict__, "distill_english": False})
    sources = recipe_sources(job.resolved_recipe(), corpora, "chat.jsonl")
    assert [s["name"] for s in sources if s.get("distill")] == ["chat"]


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_recipe", RECIPES.parents[1] / "bench" / "recipe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_marks_the_default_recipe():
    assert load_recipe(load_bench().DEFAULT_ARM) == load_recipe("default")


def test_bench_counts_the_tokens_each_source_trained(tmp_path):
    """tokens_by_source against the rows themselves: the two sources' token ids do not overlap, so each
    sample's ids say where it came from."""
    from megakor.data.blend import BlendedDataset, PackedSource
    from megakor.data.indexed import IndexedWriter

    rng = np.random.default_rng(3)
    sources = []
    for name, low, high in (("ko", 10, 500), ("en", 500, 1000)):
        w = IndexedWriter(tmp_path / name, 1000, 2)
        for _ in range(80):
            w.add(rng.integers(low, high, size=rng.integers(1, 30)).tolist() + [2])
        w.finish()
        sources.append(PackedSource(str(tmp_path / name), 16, 5, name))
    blend = BlendedDataset(sources, [0.7, 0.3], seed=4)
    want = {"ko": 0, "en": 0}
    for i in range(50):
        sample = blend[i]
        ids = sample["input_ids"][sample["input_ids"] != 2]
        want["ko" if int(ids.max()) < 500 else "en"] += int((sample["labels"] != -100).sum())
    got = load_bench().tokens_by_source(blend, 50)
    assert got == want and 0 < got["en"] < got["ko"]


def test_bench_counts_the_passes_over_korean_and_the_new_rows_exposure(tmp_path):
    """korean_reading against the rows themselves: Korean samples are told by their ids (10-500, the "new
    rows" 1000-1100 that only Korean holds, and its own end-of-document id 2, which pads the end of its
    epochs), every occurrence of a new row counted, two stages summed."""
    from collections import Counter

    from megakor.data.blend import BlendedDataset, PackedSource
    from megakor.data.indexed import IndexedWriter

    rng = np.random.default_rng(5)
    sources = []
    for name, pools, eos in (("ko", ((10, 500), (1000, 1100)), 2), ("en", ((500, 1000),), 3)):
        w = IndexedWriter(tmp_path / name, 1200, eos)
        for _ in range(40 if name == "ko" else 80):
            low, high = pools[int(rng.integers(len(pools)))]
            w.add(rng.integers(low, high, size=rng.integers(1, 30)).tolist() + [eos])
        w.finish()
        sources.append(PackedSource(str(tmp_path / name), 16, 5, name))
    blend = BlendedDataset(sources, [0.6, 0.4], seed=7)
    ko_windows, seen = 0, Counter()
    for stage_samples in (90, 40):
        for i in range(stage_samples):
            ids = blend[i]["input_ids"].tolist()
            ko_windows += all(t == 2 or 10 <= t < 500 or 1000 <= t < 1100 for t in ids)
            seen.update(t for t in ids if 1000 <= t < 1100)
    read = load_bench().korean_reading([(blend, 90), (blend, 40)], range(1000, 1100))
    assert read["ko_passes"] == pytest.approx(ko_windows / sources[0].samples_per_epoch)
    assert read["ko_passes"] > 1  # 130 samples, 60% Korean, read more than one epoch of it
    per_row = [seen[t] for t in range(1000, 1100)]
    assert read["new_rows_seen_median"] == float(np.median(per_row))
    assert read["new_rows_unseen"] == per_row.count(0)
    assert read["new_rows_seen_10"] == pytest.approx(sum(c >= 10 for c in per_row) / 100)
    assert "new_rows_seen_median" not in load_bench().korean_reading([(blend, 10)], None)


def test_bench_reading_recounts_each_arm_at_its_own_seed_and_recipe(tmp_path, monkeypatch):
    """--reading: every arm of results.json (or those --arms names) is recounted with the recipe it was
    trained with and at its own seed, and the counts land in results.json."""
    import json
    import shutil

    bench = load_bench()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(RECIPES.parents[1] / "bench" / "results" / "recipe.json", out / "results.json")
    trained = json.loads((out / "results.json").read_text())["arms"]
    calls = {}
    monkeypatch.setattr(bench, "context", lambda a, out: {"config": a.config})
    monkeypatch.setattr(bench, "plot", lambda results, folder: [])

    def reading(recipe, ctx):
        calls[len(calls)] = (recipe, list(ctx.get("overrides", [])))
        return {"ko_passes": float(len(calls))}

    monkeypatch.setattr(bench, "arm_reading", reading)
    assert bench.main(["--reading", "--out", str(out), "--results", str(tmp_path / "res")]) == 0
    assert len(calls) == len(trained)
    for (recipe, overrides), (name, arm) in zip(calls.values(), trained.items()):
        assert {k: getattr(recipe, k) for k in arm["recipe"]} == arm["recipe"]  # keys added later: defaults
        seed = name.partition("@seed")[2]
        assert overrides == ([f"train.seed={seed}"] if seed else [])
    kept = json.loads((out / "results.json").read_text())["arms"]
    assert [a["reading"]["ko_passes"] for a in kept.values()] == [float(i) for i in range(1, len(trained) + 1)]

    calls.clear()
    bench.main(["--reading", "--arms", "plain,extend_8000", "--out", str(out), "--results", str(tmp_path / "res")])
    assert sorted(r.new_tokens for r, _ in calls.values()) == [0, 0, 0, 8000]  # plain at three seeds


def test_bench_seed_runs_are_named_apart_and_their_median_is_tabled():
    """bench/recipe.py --seed: the run config copied with the new seed, arms kept as <arm>@seed<N>, and a
    median row per recipe whose ratios are the median over seeds of arm / plain CPT at the same seed."""
    import yaml

    bench = load_bench()
    from megakor.config import load_config

    config = str(RECIPES.parents[1] / "configs" / "runs" / "smollm2_korean_cpu.yaml")
    own_seed = yaml.safe_load(open(config))["train"]["seed"]
    ctx = {"config": config}
    assert bench.seeded_config(ctx, own_seed) == "" and "overrides" not in ctx
    assert bench.seeded_config(ctx, 7) == "@seed7"
    seeded, own = load_config(ctx["config"], ctx["overrides"]), load_config(config)
    assert seeded.train.seed == 7 and own.train.seed == own_seed and seeded.train.steps == own.train.steps

    def arm(ko, ko2, probes):
        return {"train_tokens": 51200, "train_flops": 4.4e13, "ko_bits_per_char": ko, "ko2_bits_per_char": ko2,
                "en_bits_per_char": 0.95, "chat_bits_per_char_ratio": 1.0, "probes_kept": probes, "probes_base_right": 58}

    results = {"base": {"ko_bits_per_char": 3.9, "ko2_bits_per_char": 3.7, "en_bits_per_char": 1.0},
               "arms": {"plain": arm(3.0, 3.0, 50), "plain@seed2": arm(3.3, 3.1, 51), "plain@seed3": arm(3.1, 2.9, 49),
                        "x": arm(2.8, 3.2, 55), "x@seed2": arm(3.2, 2.7, 54), "x@seed3": arm(2.9, 3.0, 56),
                        "single": arm(3.5, 3.5, 40)}}
    lines = bench.table(results).splitlines()
    width = lines[0].index("tokens") - 2
    rows = {line[:width].strip(): line.split() for line in lines}
    assert "single median of 1" not in rows and "plain median of 3" in rows
    assert rows["x@seed2"][-2:] == [f"{3.2 / 3.3:.3f}", f"{2.7 / 3.1:.3f}"]  # against plain at the same seed
    assert rows["single"][-2:] == [f"{3.5 / 3.0:.3f}", f"{3.5 / 3.0:.3f}"]
    assert rows["x@seed2"][2] == "-"  # results kept before the bench counted Korean tokens
    for name, ko in (("plain", 30000), ("plain@seed2", 36000), ("plain@seed3", 33000), ("x", 40000)):
        results["arms"][name]["train_tokens_by_source"] = {"ko": ko, "en": 51200 - ko}
    cells = {line[:width].strip(): line[width:].split() for line in bench.table(results).splitlines()}
    assert cells["plain@seed2"][:2] == ["51200", "36000"] and cells["plain median of 3"][1] == "33000"
    assert cells["x median of 3"][1] == "-"  # not a median of the one run that has a count
    # x's medians: ko 2.9, ko2 3.0, probes 55; ratios: the median of the paired ratios,
    # ko 2.8/3.0, 3.2/3.3, 2.9/3.1 and ko2 3.2/3.0, 2.7/3.1, 3.0/2.9
    assert rows["x median of 3"][-6:] == ["3.000", "0.950", "1.000", "55/58", f"{2.9 / 3.1:.3f}", f"{3.0 / 2.9:.3f}"]


def test_bench_draws_the_extension_arms_apart(tmp_path, monkeypatch):
    """Recipes on the base tokenizer in one set of PNGs, those that extend the vocabulary in another with
    plain CPT and the default beside them; seed runs drawn in neither."""
    bench = load_bench()

    def arm(new_tokens, ko):
        curve = [{"step": s, "tokens": 1024 * s, "ko": ko + 1 - s / 10, "ko2": ko, "en": 1.0} for s in (0, 10)]
        return {"recipe": {"new_tokens": new_tokens}, "curve": curve}

    results = {"settings": {"curve_chars": 2500}, "base": {"curve": {"ko": 5.0, "ko2": 4.0, "en": 1.0}},
               "arms": {"plain": arm(0, 3.0), "plain@seed2": arm(0, 3.1), bench.DEFAULT_ARM: arm(0, 2.9),
                        "ext": arm(4000, 3.8), "ext@seed2": arm(4000, 3.9), "other": arm(0, 3.2)}}
    groups = bench.figure_groups(results)
    assert groups == {"recipe": ["plain", bench.DEFAULT_ARM, "other"],
                      "recipe_extension": ["plain", bench.DEFAULT_ARM, "ext"]}
    from matplotlib.figure import Figure

    drawn, save = {}, Figure.savefig

    def record(fig, path, **kw):  # each file's curves: label, colour, line style
        drawn[Path(path).name] = [(line.get_label(), line.get_color(), line.get_linestyle())
                                  for line in fig.axes[0].get_lines() if line.get_label() != "base (own tokenizer)"]
        return save(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    paths = bench.plot(results, tmp_path)
    assert sorted(p.name for p in paths) == sorted(drawn) == sorted(f"{g}_{s}_bpc.png" for g in groups for s in bench.SPLITS)
    for group, names in groups.items():
        lines = drawn[f"{group}_ko_bpc.png"]
        labels = [label.removesuffix(" (= default)") for label, _, _ in lines]
        assert labels == names and len({(c, ls) for _, c, ls in lines}) == len(names)
    many = {"settings": results["settings"], "base": results["base"],
            "arms": {f"arm{i}": arm(0, 3.0 + i / 100) for i in range(30)}}
    drawn.clear()  # only the thirty-arm figures from here on
    bench.plot(many, tmp_path / "many")
    assert len({(c, ls) for _, c, ls in drawn["recipe_ko_bpc.png"]}) == 30  # thirty arms, thirty styles
    del results["arms"]["other"]  # the references only: the extension's figure draws them all
    assert bench.figure_groups(results) == {"recipe_extension": ["plain", bench.DEFAULT_ARM, "ext"]}
    del results["arms"]["ext"], results["arms"]["ext@seed2"]
    assert list(bench.figure_groups(results)) == ["recipe"]


def test_default_job_finds_plain_cpt_and_plain_cpt_on_its_own_mixture(tmp_path):
    import json

    from megakor.default_job import plain_cpt_figures

    def arm(name, ko, **recipe):
        return {"recipe": {**load_recipe(name).__dict__, **recipe}, "train_tokens": 51200, "ko_bits_per_char": ko}

    recipe = load_recipe("distill_replay_ko85")
    results = {"settings": {"eval_chars": 12000, "eval_seq_len": 512},
               "arms": {"plain": arm("plain", 3.0), "plain@seed2": arm("plain", 2.0, english_share=0.05, chat_share=0.1),
                        "distill_replay_ko85": arm("distill_replay_ko85", 2.9),  # same mixture, but distilled
                        "frozen": arm("plain", 2.5, english_share=0.05, chat_share=0.1, frozen_layers="8-21"),
                        "a_lr": arm("plain_ko85", 2.7, stage2_lr=1e-4),  # first by name, but not the baseline's lr
                        "plain_ko85": arm("plain_ko85", 2.95), "odd": {"train_tokens": 51200}}}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(results))
    job = DefaultJob()
    found = plain_cpt_figures(job, 51200, recipe, path)
    assert (found["plain"]["ko_bits_per_char"], found["same_mixture"]["arm"]) == (3.0, "plain_ko85")
    assert plain_cpt_figures(job, 51200, load_recipe("plain"), path)["same_mixture"]["arm"] == "plain"
    assert plain_cpt_figures(job, 25600, recipe, path) == {}  # another budget
    assert plain_cpt_figures(DefaultJob(eval_chars=500), 51200, recipe, path) == {}  # other held-out text


def _params(checkpoint: Path) -> tuple[int, int, bool]:
    """(parameters, hidden size, tied embeddings) of an HF checkpoint, counted by transformers."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint))
    cfg = model.config
    return sum(p.numel() for p in model.parameters()), cfg.hidden_size, bool(cfg.tie_word_embeddings)


def test_default_job_counts_the_disk_it_needs_and_refuses_before_any_work(hf_checkpoints, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    import megakor.checkpoint.gguf as gguf
    import megakor.default_job as dj
    from launch.default_job import main
    from megakor.config import ConfigError

    base = tmp_path / "out" / "base"
    shutil.copytree(hf_checkpoints["llama2"], base)
    n, hidden, tied = _params(base)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    job = DefaultJob(out=str(tmp_path / "out"))
    # Plain CPT on CPU (fp32): one stage-2 checkpoint (4 bytes of weights + 12 of fp32 master and AdamW
    # moments per parameter), its export and the final export.
    assert dj.disk_need(job, load_recipe("plain"), base)[0] == 16 * n + 4 * n + 4 * n
    # An extension: the grown model, then stage 1 (only the embedding matrix carries optimizer state).
    grown = n + 4000 * hidden * (1 if tied else 2)
    rows = (vocab + 4000) * hidden * (1 if tied else 2)
    need, what = dj.disk_need(job, load_recipe("extension_4000"), base)
    assert need == 4 * grown + (12 * rows + 4 * grown) + 4 * grown + 16 * grown + 4 * grown + 4 * grown
    assert "stage 1's DeepSpeed checkpoint" in what and "the grown checkpoint" in what
    # Again under the same --out: the grown checkpoint is built, stage 2's checkpoint is at its last step
    # (the trainer resumes and saves nothing), and exports replace the earlier run's (here a tenth of one).
    (tmp_path / "out" / "extended-4000-subword").mkdir()
    (tmp_path / "out" / "extended-4000-subword" / "config.json").write_text("{}")
    (tmp_path / "out" / "stage2" / "hf").mkdir(parents=True)
    (tmp_path / "out" / "stage2" / "hf" / "model.safetensors").write_bytes(b"\0" * (4 * grown // 10))
    import megakor.checkpoint.training as training

    monkeypatch.setattr(training, "latest_tag", lambda root: "global_step20" if "stage2" in str(root) else None)
    need, what = dj.disk_need(job, load_recipe("extension_4000"), base)
    assert need == (12 * rows + 4 * grown) + 4 * grown + (4 * grown - 4 * grown // 10) + 4 * grown
    assert "the grown checkpoint" not in what and "stage 2's DeepSpeed checkpoint 0.0 MB" in what
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "out" / "stage2")
    # A run config that saves every 10 steps and keeps 2: 3 checkpoints at once (2 kept + 1 being published).
    import yaml

    run_config = yaml.safe_load(open(job.config))
    run_config["checkpoint"].update(every=10, keep=2)
    (tmp_path / "every10.yaml").write_text(yaml.safe_dump(run_config))
    need, what = dj.disk_need(DefaultJob(out=job.out, config=str(tmp_path / "every10.yaml")), load_recipe("plain"), base)
    assert need == 3 * 16 * n + 4 * n + 4 * n and "stage 2's DeepSpeed checkpoints (3 at once)" in what

    Usage = namedtuple("Usage", "total used free")
    plain_need = dj.disk_need(job, load_recipe("plain"), base)[0]
    monkeypatch.setattr(dj.shutil, "disk_usage", lambda p: Usage(10**12, 0, plain_need))
    dj.check_disk(job, load_recipe("plain"), base)  # exactly enough
    monkeypatch.setattr(dj.shutil, "disk_usage", lambda p: Usage(10**12, 0, plain_need - 1))
    with pytest.raises(ConfigError, match="free some space there, or pass --out on a disk with room"):
        dj.check_disk(job, load_recipe("plain"), base)

    # The whole job refuses right after the base's conversion: nothing is evaluated or trained.
    monkeypatch.setattr(gguf, "fetch_smollm2_gguf", lambda cache: tmp_path / "unused.gguf")

    def no_work(*a, **k):
        raise AssertionError("the job went on past the disk check")

    monkeypatch.setattr(gguf, "convert_gguf_to_hf", no_work)
    monkeypatch.setattr(dj, "_evaluate", no_work)
    monkeypatch.setattr(dj, "_train_stage", no_work)
    import megakor.corpora as corpora

    monkeypatch.setattr(corpora, "prepare_corpora", no_work)
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "out"), "--recipe", "plain"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after whatever the job logged before the check
    assert last.startswith(f"error: --out {tmp_path / 'out'} has {(plain_need - 1) / 1e6:.1f} MB free but this job "
                           f"writes about {plain_need / 1e6:.1f} MB there")


def test_bench_refuses_to_mix_figures_scored_otherwise_and_keeps_them(tmp_path, monkeypatch, capsys):
    """An --out whose results.json was written with other settings (--wide against not, other
    --eval-chars) is refused in one sentence before any work, and its arms are kept; the same settings
    go on; --plot-only draws what results.json holds into the folder of its own mode."""
    import shutil

    bench = load_bench()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(RECIPES.parents[1] / "bench" / "results" / "recipe.json", out / "results.json")
    before = (out / "results.json").read_text()

    class Reached(Exception):
        pass

    def no_work(*args, **kwargs):
        raise Reached("the corpora are being prepared")

    monkeypatch.setattr(bench, "context", no_work)
    for flags in (["--wide"], ["--eval-chars", "5000"], ["--wide", "--reading"]):
        assert bench.main(["--arms", "plain", "--out", str(out), "--results", str(tmp_path / "res"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "pass another --out" in err, err
        assert (out / "results.json").read_text() == before
    for flags in ([], ["--reading"]):
        with pytest.raises(Reached):
            bench.main(["--arms", "plain", "--out", str(out), "--results", str(tmp_path / "res"), *flags])

    wide = json.loads(before)
    wide["settings"]["wide"] = True
    (out / "results.json").write_text(json.dumps(wide))
    monkeypatch.setattr(bench, "REPO", tmp_path)
    monkeypatch.setattr(bench, "plot", lambda results, folder: [])
    assert bench.main(["--plot-only", "--out", str(out)]) == 0  # no --wide: the results say where
    assert json.loads((tmp_path / "bench" / "results" / "wide" / "recipe.json").read_text())["settings"]["wide"]
    assert not (tmp_path / "bench" / "results" / "recipe.json").exists()
    (out / "results.json").write_text(before)
    assert bench.main(["--plot-only", "--wide", "--out", str(out)]) == 0  # --wide, but narrow results
    assert "wide" not in json.loads((tmp_path / "bench" / "results" / "recipe.json").read_text())["settings"]
    assert "wide None there, True asked" in bench.settings_clash(json.loads(before), {"wide": True}, out)
    settings = json.loads(before)["settings"]
    assert bench.settings_clash(json.loads(before), settings, out) is None
    assert "0 arms" in bench.settings_clash({"arms": {}, "settings": settings}, {"wide": True}, out)  # work/ may be stale
    assert bench.settings_clash({"arms": {}}, {"wide": True}, out) is None  # a new --out
    assert "eval_documents" in bench.settings_clash(
        json.loads(before), {**settings, "eval_documents": {"ko": 1, "ko2": 1, "en": 1}}, out)
