"""megakor's Korean recipe against plain continued pretraining at equal training tokens, on SmolLM2-135M, CPU.

Every arm is a recipe under configs/recipes/ (the default job reads the same files). All arms train on
the same Korean and English data (the default job's corpora and blend, the run config's batches:
4 × 256 tokens a step, cosine schedule, AdamW) for the same number of training tokens, and are scored
on the same held-out text:
  ko   the default job's held-out Korean documents (same sources as training, never trained on)
  ko2  LibreOffice's Korean help (Debian's libreoffice-help-ko), a domain held out whole
  en   held-out English prose (Python's help topics)
as bits per character (each model with its own tokenizer), every --eval-every steps, plus retention of
what the base could do (megakor/retention.py): its own chat answers' bits per character relative to
the base, and the factual probes it answers right that stay right.

Arms run in one process, one after another (no DeepSpeed: a single CPU process needs no sharding, and
the batches are the trainer's own, which do not depend on the data-parallel layout). The trainer's
step is reproduced exactly: loss summed over the global batch's labelled tokens, gradient clipping at
1.0, torch AdamW (what DeepSpeed runs on CPU), stage 1 masking the base rows as train.freeze does.

    python bench/recipe.py                                  # every recipe under configs/recipes/
    python bench/recipe.py --arms plain,default --out runs/bench/recipe
    python bench/recipe.py --arms plain,default --seed 2   # the same arms at another data order (plain@seed2, ...)
    python bench/recipe.py --plot-only                     # redraw the PNGs and the table from results.json
    python bench/recipe.py --wide --arms configs/recipes/long/plain.yaml,configs/recipes/long/extend_8000.yaml \
        --out runs/bench/wide --eval-every 50               # 6x the budget, LibreOffice's help trained on too

Each arm's final export is kept at OUT/<arm>/hf (transformers loads it); the figures accumulate in
OUT/results.json (arms already there are skipped unless --rerun), the curves in bench/results/. A recipe
run at several seeds (the blend's document order and sampling; arms with the same mixture at one seed see
the same documents) gets a median row in the table: each figure's median over its seeds, and as ratios the
median over seeds of arm / plain CPT at the same seed. Plain CPT's own Korean moves by 3.6% between seeds
at this budget, much of it the Korean share a 200-sample run draws (the table's "ko tok" column).

The training sources hold 206,980 characters of Korean after cleaning: an arm with 8,000 new tokens has read
them all once by about 118,000 training tokens. --wide trains on LibreOffice's help too (all of it but the
pages is_heldout holds out, which ko2 then scores: the same leading pages as without --wide), about five
times the Korean, so longer arms compare tokenizers on fresh text rather than fresh against repeated text.
Its figures go to their own --out and bench/results/wide/; an --out written with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megakor.default_job import Recipe, load_recipe, prepare_start, recipe_sources, RECIPES  # noqa: E402

SPLITS = ("ko", "ko2", "en")
BASELINE = "plain"
DEFAULT_ARM = "distill_replay_ko85"  # the arm whose settings configs/recipes/default.yaml holds


def bench_corpora(cache, wide: bool) -> dict:
    """The default job's corpora, or with `wide` those of `prepare_wide_corpora` (LibreOffice's help trained
    on too, less its held-out share, which is then ko2)."""
    from megakor.corpora import prepare_corpora, prepare_wide_corpora

    return prepare_wide_corpora(cache) if wide else prepare_corpora(cache)


def held_out_splits(cache, eval_chars: int, corpora: dict) -> dict[str, list[str]]:
    """The leading documents of each held-out split, up to `eval_chars` characters (the default job's
    reader, so both score the same text). ko2 is `corpora["ko2.heldout"]` when there is one (the wide
    corpora), else LibreOffice's whole help."""
    from megakor.corpora import prepare_heldout_domain
    from megakor.default_job import _read_jsonl

    return {"ko": _read_jsonl(corpora["ko.heldout"], eval_chars),
            "ko2": _read_jsonl(corpora.get("ko2.heldout") or prepare_heldout_domain(cache), eval_chars),
            "en": _read_jsonl(corpora["en.heldout"], eval_chars)}


def evaluate_model(model, tokenizer, splits: dict[str, list[str]], seq_len: int) -> dict[str, float]:
    from megakor.evaluate import evaluate_texts

    return {name: evaluate_texts(model, tokenizer, texts, seq_len)["bits_per_char"] for name, texts in splits.items()}


def train_stage(model, batches, steps: int, lr: float, freeze_below: int | None, cfg, on_step,
                frozen_layers: range = range(0)) -> None:
    """One stage, the trainer's step in one process: summed NLL / labelled tokens of the global batch,
    clip to cfg.train.grad_clip, AdamW at the cosine schedule's rate (warmup, then down to lr/10).
    Decoder layers in `frozen_layers` keep their weights. Rows of distilled sources are scored by KL
    against the stage's start. `on_step(loss, tokens the teacher read)`."""
    from megakor.train.schedule import lr_at

    import copy

    from megakor.train.loop import teacher_inputs

    # Sources with distill: true are scored against the stage's start, as the trainer's teacher is model.init_from.
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if batches.dataset.distill else None
    model.train_only_vocab_rows_from(freeze_below)
    frozen = tuple(f"layers.{i}." for i in frozen_layers)
    for name, p in model.named_parameters():
        p.requires_grad_((freeze_below is None and not name.startswith(frozen)) or name == "tok_embeddings.weight")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.optim.schedule, lr, lr / 10, cfg.optim.warmup_steps, steps)
        b = next(batches)
        tokens = max(int((b["labels"] != -100).sum()), 1)
        distill = teacher_inputs(teacher, b, "cpu")
        loss = model(b["input_ids"], b["position_ids"], b["labels"], reduction="sum",
                     **({} if distill is None else {"teacher": distill})) / tokens
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_step(float(loss.detach()), 0 if distill is None else int(distill[0].numel()) * b["input_ids"].shape[1])
    model.train_only_vocab_rows_from(None)
    for p in model.parameters():
        p.requires_grad_(True)


def tokens_by_source(blend, samples: int) -> dict[str, int]:
    """Predicted (labelled) tokens of each source in the blend's first `samples` samples: what a stage
    of that many samples trained on, e.g. how much of the budget was Korean."""
    counts = dict.fromkeys(blend.names, 0)
    for i in range(samples):
        source, _ = blend.locate(i)
        counts[blend.names[source]] += int((blend[i]["labels"] != -100).sum())
    return counts


def korean_reading(reads, new_rows: range | None) -> dict:
    """What training gave the Korean source ("ko") and the new vocabulary rows, over `reads`, a list of
    (blend, samples) for each stage (a stage trains on its blend's first `samples` samples): the windows
    read from Korean over its windows per epoch (passes over the Korean training text, repeats counted),
    and for `new_rows` (token ids) how many times each appears as an input: the median over the new rows,
    the share seen at least 10 times, and how many never appear."""
    passes, counts = 0.0, None if new_rows is None else np.zeros(len(new_rows), dtype=np.int64)
    for blend, samples in reads:
        ko, windows = blend.names.index("ko"), 0
        for i in range(samples):
            source, _ = blend.locate(i)
            windows += source == ko
            if counts is not None:
                ids = blend[i]["input_ids"].numpy()
                ids = ids[(ids >= new_rows.start) & (ids < new_rows.stop)] - new_rows.start
                counts += np.bincount(ids, minlength=len(new_rows))
        passes += windows / blend.sources[ko].samples_per_epoch
    read = {"ko_passes": passes}
    if counts is not None:
        read.update(new_rows_seen_median=float(np.median(counts)), new_rows_seen_10=float((counts >= 10).mean()),
                    new_rows_unseen=int((counts == 0).sum()))
    return read


def stage_blend(recipe: Recipe, ctx: dict, tok_dir, cfg):
    """The blend each stage of an arm trains on: each stage is its own trainer run in the default job, so
    its data starts from the blend's beginning."""
    from megakor.data.blend import build_datasets

    sources = recipe_sources(recipe, ctx["corpora"], ctx["chat_replay"])
    train_set, _ = build_datasets(sources, None, str(tok_dir), cfg.train.seq_len, cfg.train.seed,
                                  str(ctx["out"] / "work" / "data"), 1)
    return train_set


def arm_reading(recipe: Recipe, ctx: dict) -> dict:
    """korean_reading of an arm, without training it (the data order is fixed by the recipe and the seed)."""
    from megakor.checkpoint.resize import base_vocab_size
    from megakor.config import load_config
    from megakor.default_job import recipe_tokenizer
    from megakor.tokenizer import load_tokenizer

    cfg = load_config(ctx["config"], ctx.get("overrides"))
    tok_dir = recipe_tokenizer(recipe, ctx["base"], ctx["corpora"]["ko.train"], ctx["out"] / "work")
    new_rows = range(base_vocab_size(tok_dir), len(load_tokenizer(tok_dir))) if recipe.new_tokens else None
    blend = stage_blend(recipe, ctx, tok_dir, cfg)
    return korean_reading([(blend, steps * cfg.train.global_batch)
                           for steps in (recipe.stage1_steps, recipe.stage2_steps) if steps], new_rows)


def stage_flops(args, seq_len: int, tokens: int, frozen_body: bool, frozen_layers: int = 0) -> float:
    """Training FLOPs of `tokens`: 6N per token (+ attention) for all weights; the weight gradients (2 FLOPs
    per weight and token) of frozen matrices are not computed: every matrix in stage 1 (only activation
    gradients flow), the frozen decoder layers' in stage 2."""
    from megakor.train.metrics import flops_per_token, matmul_parameters

    per_token = flops_per_token(args, seq_len)
    if frozen_body:
        per_token -= 2.0 * matmul_parameters(args)
    elif frozen_layers:
        per_layer = (matmul_parameters(args) - args.vocab_size * args.hidden_size) / args.num_layers
        per_token -= 2.0 * per_layer * frozen_layers
    return per_token * tokens


def teacher_flops(args, seq_len: int, tokens: int) -> float:
    """The teacher's forward over the distilled tokens: a third of training's 6N (+ attention) per token."""
    from megakor.train.metrics import flops_per_token

    return flops_per_token(args, seq_len) / 3 * tokens


def run_arm(name: str, recipe: Recipe, ctx: dict, eval_every: int) -> dict:
    from megakor.checkpoint.hf import save_hf_checkpoint
    from megakor.config import load_config
    from megakor.data.blend import BatchIterator
    from megakor.checkpoint.source import build_model
    from megakor.retention import answer_bits_per_char, retention
    from megakor.tokenizer import load_tokenizer

    out, t0 = ctx["out"], time.time()
    cfg = load_config(ctx["config"], ctx.get("overrides"))
    tok_dir, start = prepare_start(recipe, ctx["base"], ctx["corpora"]["ko.train"], out / "work")
    tokenizer = load_tokenizer(tok_dir)
    model, ckpt = build_model(str(start), loss_chunk_tokens=cfg.model.loss_chunk_tokens)
    args = ckpt.args
    first_new = ckpt.args.vocab_size - recipe.new_tokens if recipe.new_tokens else None
    if first_new is not None:
        from megakor.checkpoint.resize import base_vocab_size

        first_new = base_vocab_size(tok_dir)
    step_tokens = cfg.train.global_batch * cfg.train.seq_len
    curve, losses, flops = [], [], 0.0

    def point(step: int):
        bpc = evaluate_model(model, tokenizer, ctx["curve_splits"], ctx["eval_seq_len"])
        curve.append({"step": step, "tokens": step * step_tokens, "flops": flops, **bpc})
        print(f"  [{name}] step {step:3d} ({step * step_tokens:6d} tokens, {time.time() - t0:5.0f} s): "
              + "  ".join(f"{k} {v:.4f}" for k, v in bpc.items()), flush=True)

    point(0)
    done, by_source = 0, {}
    for steps, lr, freeze in ((recipe.stage1_steps, recipe.stage1_lr, first_new), (recipe.stage2_steps, recipe.stage2_lr, None)):
        if not steps:
            continue
        train_set = stage_blend(recipe, ctx, tok_dir, cfg)
        batches = BatchIterator(train_set, cfg.train.global_batch, cfg.train.global_batch)
        stage_frozen = freeze is not None

        def on_step(loss, teacher_tokens, stage_frozen=stage_frozen):
            nonlocal done, flops
            done += 1
            flops += stage_flops(args, cfg.train.seq_len, step_tokens, stage_frozen,
                                 0 if stage_frozen else len(recipe.frozen_layer_range()))
            flops += teacher_flops(args, cfg.train.seq_len, teacher_tokens)
            losses.append(loss)
            if done % eval_every == 0 and done != recipe.steps:
                point(done)

        train_stage(model, batches, steps, lr, freeze, cfg, on_step,
                    recipe.frozen_layer_range() if freeze is None else range(0))
        for source, tokens in tokens_by_source(train_set, steps * cfg.train.global_batch).items():
            by_source[source] = by_source.get(source, 0) + tokens
    point(done)
    train_seconds = time.time() - t0
    hf = out / name / "hf"
    base_config = json.loads((Path(start) / "config.json").read_text())
    if recipe.merge_keep < 1:  # the trained export beside the merged one, and the curve's last point merged
        from megakor.checkpoint.merge import merge_toward_start

        trained = save_hf_checkpoint(model.state_dict(), args, out / name / "trained", base_config=base_config,
                                     tokenizer_dir=tok_dir)
        merge_toward_start(start, trained, recipe.merge_keep, hf)
        del model
        model, _ = build_model(str(hf), loss_chunk_tokens=cfg.model.loss_chunk_tokens)
        curve.append({"step": done, "tokens": done * step_tokens, "flops": flops, "merged": True,
                      **evaluate_model(model, tokenizer, ctx["curve_splits"], ctx["eval_seq_len"])})
    else:
        save_hf_checkpoint(model.state_dict(), args, hf, base_config=base_config, tokenizer_dir=tok_dir)
    final = evaluate_model(model, tokenizer, ctx["splits"], ctx["eval_seq_len"])
    chat = answer_bits_per_char(model, tokenizer, [tuple(p) for p in ctx["reference"]["heldout"]])
    del model
    kept = retention(hf, ctx["reference"], ctx["base_chat_bpc"], chat_bits_per_char=chat["bits_per_char"])
    return {"recipe": recipe.__dict__, "train_tokens": recipe.steps * step_tokens, "train_flops": flops,
            "train_tokens_by_source": by_source, "reading": arm_reading(recipe, ctx),
            "vocab_size": args.vocab_size, **{f"{k}_bits_per_char": final[k] for k in ctx["splits"]},
            **kept, "curve": curve, "loss": losses, "train_seconds": round(train_seconds, 1),
            "seconds": round(time.time() - t0, 1), "hf_export": str(hf), "load": os.getloadavg()[0]}


def base_figures(ctx: dict) -> dict:
    """The untrained base with its own tokenizer: bits per character on every split and its own chat
    answers (the retention reference's denominator)."""
    from megakor.checkpoint.source import build_model
    from megakor.retention import answer_bits_per_char
    from megakor.tokenizer import load_tokenizer

    model, _ = build_model(str(ctx["base"]))
    tok = load_tokenizer(ctx["base"])
    bpc = evaluate_model(model, tok, ctx["splits"], ctx["eval_seq_len"])
    curve = evaluate_model(model, tok, ctx["curve_splits"], ctx["eval_seq_len"])
    chat = answer_bits_per_char(model, tok, [tuple(p) for p in ctx["reference"]["heldout"]])
    return {**{f"{k}_bits_per_char": v for k, v in bpc.items()}, "curve": curve, "chat_bits_per_char": chat["bits_per_char"],
            "chat_answers": chat["answers"], "chat_chars": chat["chars"]}


def table(results: dict) -> str:
    base, arms = results["base"], results["arms"]
    width = max([26] + [len(n) + 2 for n in arms] + [len(f"{n} median of {len(r)}") + 2 for n, r in seed_groups(arms).items()])
    head = (f"{'arm':{width}}{'tokens':>8}{'ko tok':>8}{'PFLOPs':>8}{'ko':>8}{'ko2':>8}{'en':>8}{'chat×':>7}{'probes':>8}"
            f"{'ko/plain':>9}{'ko2/plain':>10}")
    lines = [head, f"{'base (untrained)':{width}}{0:>8}{0:>8}{0:>8.3f}" + "".join(f"{base[f'{k}_bits_per_char']:>8.3f}" for k in SPLITS)
             + f"{1.0:>7.3f}{'-':>8}"]
    for name, a in arms.items():
        plain = arms.get(BASELINE + seed_suffix(name))  # plain CPT at the same seed (paired)
        ratios = "".join(f"{a[f'{k}_bits_per_char'] / plain[f'{k}_bits_per_char']:>{w}.3f}" if plain else f"{'-':>{w}}"
                         for k, w in (("ko", 9), ("ko2", 10)))
        lines.append(f"{name:{width}}{a['train_tokens']:>8}{korean_tokens(a):>8}{a['train_flops'] / 1e15:>8.3f}"
                     + "".join(f"{a[f'{k}_bits_per_char']:>8.3f}" for k in SPLITS)
                     + f"{a['chat_bits_per_char_ratio']:>7.3f}{a['probes_kept']:>4}/{a['probes_base_right']:<3}" + ratios)
    for name, runs in seed_groups(arms).items():
        med = {k: statistics.median(a[k] for a in runs.values()) for k in
               [f"{s}_bits_per_char" for s in SPLITS] + ["chat_bits_per_char_ratio", "train_flops"]}
        med["probes_kept"] = statistics.median_low(a["probes_kept"] for a in runs.values())  # a count some run kept
        # Ratios: the median over seeds of arm@seed / plain@seed (the same data order: the recipe's effect,
        # not the draw of documents), over the seeds plain CPT ran at too.
        paired = [(a, arms[BASELINE + seed]) for seed, a in runs.items() if BASELINE + seed in arms]
        ratios = "".join(f"{statistics.median(a[f'{k}_bits_per_char'] / b[f'{k}_bits_per_char'] for a, b in paired):>{w}.3f}"
                         if paired else f"{'-':>{w}}" for k, w in (("ko", 9), ("ko2", 10)))
        first = next(iter(runs.values()))
        ko_tokens = [korean_tokens(a) for a in runs.values()]
        ko_median = statistics.median_low(ko_tokens) if all(isinstance(t, int) for t in ko_tokens) else "-"
        lines.append(f"{name + f' median of {len(runs)}':{width}}{first['train_tokens']:>8}"
                     f"{ko_median:>8}{med['train_flops'] / 1e15:>8.3f}"
                     + "".join(f"{med[f'{k}_bits_per_char']:>8.3f}" for k in SPLITS)
                     + f"{med['chat_bits_per_char_ratio']:>7.3f}{med['probes_kept']:>4}/{first['probes_base_right']:<3}"
                     + ratios)
    return "\n".join(lines)


def reading_table(results: dict) -> str:
    """What each arm's training read (arms with a "reading", see korean_reading)."""
    rows = [f"{'arm':28}{'new tokens':>11}{'ko tokens':>10}{'Korean passes':>14}{'new rows: median seen':>23}"
            f"{'seen >= 10':>11}{'never seen':>11}"]
    for name, a in results["arms"].items():
        r = a.get("reading")
        if r is None:
            continue
        rows.append(f"{name:28}{a['recipe'].get('new_tokens', 0):>11}{korean_tokens(a):>10}{r['ko_passes']:>14.2f}"
                    + (f"{r['new_rows_seen_median']:>23.1f}{r['new_rows_seen_10']:>11.1%}{r['new_rows_unseen']:>11}"
                       if "new_rows_seen_median" in r else f"{'-':>23}{'-':>11}{'-':>11}"))
    return "\n".join(rows)


def korean_tokens(arm: dict) -> int | str:
    """The Korean tokens an arm trained on ("-" for results kept before the bench counted them)."""
    return arm.get("train_tokens_by_source", {}).get("ko", "-")


def seed_groups(arms: dict) -> dict[str, dict[str, dict]]:
    """Recipes trained at the run config's seed and at least one other: recipe name -> {seed suffix ("" for
    the run config's seed, "@seed<N>"): figures}. A recipe never run at the run config's seed gets no group."""
    groups: dict[str, dict[str, dict]] = {}
    for name, a in arms.items():
        seed = seed_suffix(name)
        groups.setdefault(name[:len(name) - len(seed)], {})[seed] = a
    return {name: runs for name, runs in groups.items() if len(runs) > 1 and name in arms}


def figure_groups(results: dict) -> dict[str, list[str]]:
    """The arms each set of curves draws, by file prefix: "recipe" the recipes on the base tokenizer,
    "recipe_extension" those that extend the vocabulary, with plain CPT and the default beside them
    for reference ("recipe" then left out if those are all it would draw). Each recipe once, at the run
    config's seed."""
    arms = {n: a for n, a in results["arms"].items() if not seed_suffix(n)}
    extends = {n for n, a in arms.items() if a.get("recipe", {}).get("new_tokens", 0) > 0}
    groups = {"recipe": [n for n in arms if n not in extends]}
    if extends:
        groups["recipe_extension"] = [n for n in arms if n in extends or n in (BASELINE, DEFAULT_ARM)]
        if set(groups["recipe"]) <= set(groups["recipe_extension"]):  # nothing the extension figure lacks
            del groups["recipe"]
    return groups


def plot(results: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    # Ten colours, solid, then dashed, then dash-dotted: no two of up to thirty arms in a figure drawn alike.
    styles = cycler(linestyle=["-", "--", "-."]) * cycler(color=plt.get_cmap("tab10").colors)

    folder.mkdir(parents=True, exist_ok=True)
    titles = {"ko": "held-out Korean (training sources)", "ko2": "held-out Korean domain (LibreOffice help)",
              "en": "held-out English (Python help topics)"}
    if results["settings"].get("wide"):
        titles["ko2"] = "LibreOffice help, held-out pages"
    paths = []
    for prefix, names in figure_groups(results).items():
        for split in SPLITS:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            ax.set_prop_cycle(styles)
            for name in names:
                a = results["arms"][name]
                trained = [p for p in a["curve"] if not p.get("merged")]
                line, = ax.plot([p["tokens"] for p in trained], [p[split] for p in trained], marker="o", markersize=3,
                                label=name + (" (= default)" if name == DEFAULT_ARM else ""),
                                linewidth=2.2 if name in (DEFAULT_ARM, BASELINE) else 1.2)
                for p in a["curve"]:
                    if p.get("merged"):  # after merging back toward the start: a star above the last point
                        ax.plot([p["tokens"]], [p[split]], marker="*", markersize=11, color=line.get_color(),
                                linestyle="none")
            ax.axhline(results["base"]["curve"][split], color="grey", linestyle=":", label="base (own tokenizer)")
            ax.set_xlabel(f"training tokens (curves: the split's leading documents, {results['settings']['curve_chars']:,}+ characters)")
            ax.set_ylabel("bits per character")
            ax.set_title(f"SmolLM2-135M: {titles[split]}" + (", vocabulary extension" if prefix != "recipe" else ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = folder / f"{prefix}_{split}_bpc.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def context(a, out: Path) -> dict:
    """What every arm shares: the base (converted once under `out`), the corpora, the held-out splits, the
    base's chat answers and factual probes (cached per base) and the chat replay written from them."""
    from megakor.checkpoint.gguf import convert_gguf_to_hf, fetch_smollm2_gguf
    from megakor.retention import base_reference, write_replay_jsonl
    from megakor.tokenizer import load_tokenizer

    base = out / "base"
    if not (base / "config.json").exists():
        convert_gguf_to_hf(fetch_smollm2_gguf(a.cache), base)
    corpora = bench_corpora(a.cache, a.wide)
    ctx = {"out": out, "base": base, "config": a.config, "corpora": corpora,
           "splits": held_out_splits(a.cache, a.eval_chars, corpora),
           "curve_splits": held_out_splits(a.cache, a.curve_chars, corpora),
           "eval_seq_len": a.eval_seq_len, "reference": base_reference(base, a.cache)}
    ctx["chat_replay"] = write_replay_jsonl(ctx["reference"], load_tokenizer(base), out / "work" / "chat_replay.jsonl")
    return ctx


def settings_clash(results: dict, settings: dict, path: Path) -> str | None:
    """One sentence if `results` was written with other settings than `settings` asks (other held-out text,
    or the wide corpora against the narrow): its arms' figures would not compare, and they are not
    overwritten; an --out without arms is refused too, as its work/ may hold a tokenizer learned from the
    other corpora. Keys absent from `settings` are compared only if it has them (eval_documents, known
    after the corpora)."""
    kept = results.get("settings")
    if kept is None:
        return None
    keys = set(settings) | ({"wide"} if "wide" in kept else set())
    differ = sorted(k for k in keys if kept.get(k) != settings.get(k))
    if not differ:
        return None
    shown = ", ".join(f"{k} {kept.get(k)!r} there, {settings.get(k)!r} asked" for k in differ)
    return (f"{path} was written with other settings ({shown}; {len(results.get('arms', {}))} arms scored); "
            f"pass another --out for these, or the settings it was written with")


def seeded_config(ctx: dict, seed: int | None) -> str:
    """Train ctx's arms at train.seed = `seed` (the blend's document order and sampling), as a config
    override; returns the arm-name suffix, "" at the run config's own seed."""
    from megakor.config import load_config

    if seed is None or seed == load_config(ctx["config"]).train.seed:
        return ""
    ctx["overrides"] = [f"train.seed={seed}"]
    return f"@seed{seed}"


def seed_suffix(name: str) -> str:
    """"@seed<N>" of an arm trained at another seed, "" for one at the run config's seed."""
    return name[len(name.split("@seed")[0]):]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=None, help="comma-separated recipe names under configs/recipes/ or recipe YAML paths, an arm named by its file (default: all)")
    ap.add_argument("--out", default="runs/bench/recipe", help="arms' exports and results.json")
    ap.add_argument("--results", default=None,
                    help="where the PNGs and a copy of results.json go (default bench/results, with --wide bench/results/wide)")
    ap.add_argument("--cache", default=None, help="download cache ($MEGAKOR_CACHE or ~/.cache/megakor)")
    ap.add_argument("--eval-chars", type=int, default=12000, help="characters of each held-out split (the default job's)")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-every", type=int, default=10, help="steps between evaluations during training")
    ap.add_argument("--curve-chars", type=int, default=2500,
                    help="characters of each split scored at the points of the curves (the final figures use --eval-chars)")
    ap.add_argument("--config", default=str(REPO / "configs/runs/smollm2_korean_cpu.yaml"), help="run config (batches, schedule)")
    ap.add_argument("--seed", type=int, default=None,
                    help="the data order's seed (default: the run config's train.seed); arms trained at another "
                         "seed are kept as <arm>@seed<N>, and the table adds each arm's median over its seeds")
    ap.add_argument("--rerun", action="store_true", help="train arms again even if results.json has them")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--reading", action="store_true",
                    help="for the arms in results.json (those of --arms, at every seed), what their training read: "
                         "passes over the Korean training text and how often each new vocabulary row was an input; "
                         "no training (the data order is fixed by the recipe and the seed)")
    ap.add_argument("--wide", action="store_true",
                    help="train on LibreOffice's Korean help too, all but its held-out share (which ko2 then scores): "
                         "about five times the Korean text, for budgets at which the training sources alone would "
                         "be read again (long arms, e.g. configs/recipes/long/); use its own --out")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (on a shared CPU a second OpenMP thread mostly spin-waits; run arms as "
                         "separate processes instead)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"arms": {}}
    names = a.arms.split(",") if a.arms else sorted(p.stem for p in RECIPES.glob("*.yaml"))
    asked = {"eval_chars": a.eval_chars, "eval_seq_len": a.eval_seq_len, "curve_chars": a.curve_chars,
             **({"wide": True} if a.wide else {})}
    clash = None if a.plot_only else settings_clash(results, asked, results_path)
    if clash:
        print(f"error: {clash}", file=sys.stderr)
        return 2
    if a.reading:
        ctx = context(a, out)
        for name, arm in results["arms"].items():
            if a.arms and name.split("@seed")[0] not in {Path(n).stem for n in names}:
                continue
            ctx.pop("overrides", None)
            seeded_config(ctx, int(seed_suffix(name)[5:]) if seed_suffix(name) else None)
            known = {f.name for f in fields(Recipe)}  # a results file may predate a recipe key's removal
            arm["reading"] = arm_reading(Recipe(**{k: v for k, v in arm["recipe"].items() if k in known}), ctx)
        results_path.write_text(json.dumps(results, indent=1))
    elif not a.plot_only:
        recipes = {n: load_recipe(n) for n in names}  # every file validated before an hour of training
        ctx = context(a, out)
        settings = {**asked, "eval_documents": {k: len(v) for k, v in ctx["splits"].items()}}
        clash = settings_clash(results, settings, results_path)
        if clash:  # the same options, other documents: the corpora changed since those arms were scored
            print(f"error: {clash}", file=sys.stderr)
            return 2
        results["settings"] = settings
        if "base" not in results:
            results["base"] = base_figures(ctx)
            results_path.write_text(json.dumps(results, indent=1))
        ctx["base_chat_bpc"] = results["base"]["chat_bits_per_char"]
        suffix = seeded_config(ctx, a.seed)
        for recipe_name in names:
            name = Path(recipe_name).stem + suffix  # a recipe given as a path is named by its file
            if name in results["arms"] and not a.rerun:
                print(f"{name}: in {results_path} already (--rerun to train again)")
                continue
            print(f"{name}: {recipes[recipe_name].description} (load {os.getloadavg()[0]:.1f})", flush=True)
            results["arms"][name] = run_arm(name, recipes[recipe_name], ctx, a.eval_every)
            # Re-read before writing: another invocation may have added arms meanwhile.
            merged = json.loads(results_path.read_text()) if results_path.exists() else {"arms": {}}
            if merged.get("settings") == results["settings"]:
                results["arms"] = {**merged["arms"], **results["arms"]}
            results_path.write_text(json.dumps(results, indent=1))
            print(table(results), flush=True)
    wide = results["settings"].get("wide", False) if "settings" in results else a.wide  # what results.json holds
    results_dir = Path(a.results or REPO / "bench" / "results" / ("wide" if wide else ""))
    results_dir.mkdir(parents=True, exist_ok=True)
    slim = {**results, "arms": {k: {kk: vv for kk, vv in v.items() if kk != "loss"} for k, v in results["arms"].items()}}
    (results_dir / "recipe.json").write_text(json.dumps(slim, indent=1))
    for p in plot(results, results_dir):
        print(f"curves: {p}")
    print(table(results))
    if any("reading" in arm for arm in results["arms"].values()):
        print(reading_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
