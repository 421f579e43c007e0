"""Every bad input is refused by launch/train.py before any process group exists or any weight file is
opened: exit status 2 and one sentence naming the key or path (megakor.train.preflight).

The table runs in-process through launch/train.py's main() (as world size 1, and as rank 0 and rank 1 of
a world of 2, which must stay silent), with every weight-file open and process-group start recorded;
a few cases also run as real 2-process launches (tests/train_probe.py records the same there)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import make_hf_checkpoint
from dist_utils import REPO, launch, write_corpus
from train_probe import install, train_main

CONFIG = "configs/runs/tiny_cpu.yaml"
MAX_SECONDS = 20


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny HF checkpoint (one shard, and sharded), a preprocessed corpus, raw text, and bad copies."""
    root = tmp_path_factory.mktemp("preflight")
    hf = make_hf_checkpoint(root / "hf", "llama3")
    sharded = root / "sharded"
    shutil.copytree(hf, sharded)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(hf / "model.safetensors"))
    names = sorted(tensors)
    half = {n: tensors[n] for n in names[: len(names) // 2]}, {n: tensors[n] for n in names[len(names) // 2:]}
    (sharded / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate(half):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(part, str(sharded / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    def variant(name: str, edit) -> Path:
        d = root / name
        shutil.copytree(hf, d)
        edit(d)
        return d

    def config_edit(**changes):
        def edit(d):
            cfg = json.loads((d / "config.json").read_text())
            for k, v in changes.items():
                if v is None:
                    cfg.pop(k)
                else:
                    cfg[k] = v
            (d / "config.json").write_text(json.dumps(cfg))
        return edit

    def corrupt_header(d):
        data = bytearray((d / "model.safetensors").read_bytes())
        data[8:40] = b"\x00\xff" * 16  # the JSON header's first bytes
        (d / "model.safetensors").write_bytes(bytes(data))

    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) - 1000])

    def drop_tensor(d):
        t = load_file(str(d / "model.safetensors"))
        t.pop("model.layers.1.mlp.down_proj.weight")
        save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})

    small_vocab = make_hf_checkpoint(root / "small_vocab", "llama3", vocab_size=250)  # its tokenizer has 300

    raw = root / "raw"
    raw.mkdir()
    doc = {"text": "대한민국은 민주공화국이다. " * 5}
    (raw / "ko.jsonl").write_text(json.dumps(doc, ensure_ascii=False) + "\n")
    unreadable = root / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.jsonl").write_text('{"body": "no text field here"}\nnot json at all\n')
    (unreadable / "b.txt").write_text("")
    only_other = root / "only_other"
    only_other.mkdir()
    (only_other / "notes.docx").write_bytes(b"PK\x03\x04")
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "vocab.txt").write_text("a\n")
    a_file = root / "a_file"
    a_file.write_text("not a directory")
    return {
        "root": root, "hf": hf,
        "prefix": write_corpus(root / "train", 50, vocab=300, seed=0),
        "big_vocab_prefix": write_corpus(root / "big", 20, vocab=1000, seed=1),
        "raw": raw, "unreadable": unreadable, "only_other": only_other, "no_tokenizer": no_tokenizer,
        "a_file": a_file,
        "gemma": variant("gemma", config_edit(model_type="gemma")),
        "qwen3": variant("qwen3", config_edit(model_type="qwen3")),
        "phi3": variant("phi3", config_edit(model_type="phi3")),
        "no_hidden": variant("no_hidden", config_edit(hidden_size=None)),
        "gelu": variant("gelu", config_edit(hidden_act="gelu")),
        "other_size": variant("other_size", config_edit(vocab_size=200)),
        "small_vocab": small_vocab,
        "truncated_config": variant("truncated_config", lambda d: (d / "config.json").write_text(
            (d / "config.json").read_text()[:60])),
        "corrupt_header": variant("corrupt_header", corrupt_header),
        "truncated_weights": variant("truncated_weights", truncate),
        "dropped_tensor": variant("dropped_tensor", drop_tensor),
        "missing_shard": (lambda d: ((d / "model-00002-of-00002.safetensors").unlink(), d)[1])(
            shutil.copytree(sharded, root / "missing_shard")),
        "sharded": sharded,
    }


def _yaml(root: Path, name: str, text: str, encoding: str = "utf-8") -> str:
    p = root / f"{name}.yaml"
    p.write_bytes(text.encode(encoding))
    return str(p)


def cases(x: dict) -> list[tuple[str, list[str], str, str | None]]:
    """(id, launch/train.py arguments after the defaults, the sentence's essential part, a config file)."""
    hf, prefix, root = x["hf"], x["prefix"], x["root"]
    src = f"data.sources=[{{path: {prefix}}}]"
    on_hf = [f"model.init_from={hf}", src]
    raw_src = f"data.sources=[{{path: {x['raw']}}}]"
    return [
        # model source
        ("gemma", [f"model.init_from={x['gemma']}", src], "model_type 'gemma' is not supported", None),
        ("qwen3", [f"model.init_from={x['qwen3']}", src], "model_type 'qwen3' is not supported", None),
        ("phi3", [f"model.init_from={x['phi3']}", src], "model_type 'phi3' is not supported", None),
        ("truncated config.json", [f"model.init_from={x['truncated_config']}", src],
         f"{x['truncated_config']}/config.json is not valid JSON", None),
        ("config.json lacks a field", [f"model.init_from={x['no_hidden']}", src], "lacks the field 'hidden_size'",
         None),
        ("unsupported activation", [f"model.init_from={x['gelu']}", src], "hidden_act 'gelu' is not supported", None),
        ("corrupt safetensors header", [f"model.init_from={x['corrupt_header']}", src],
         f"{x['corrupt_header']}/model.safetensors", None),
        ("truncated safetensors", [f"model.init_from={x['truncated_weights']}", src],
         f"{x['truncated_weights']}/model.safetensors is truncated", None),
        ("missing weight shard", [f"model.init_from={x['missing_shard']}", src],
         "checkpoint shard model-00002-of-00002.safetensors listed in model.safetensors.index.json is missing", None),
        ("config.json of another size", [f"model.init_from={x['other_size']}", src],
         "config.json implies model.embed_tokens.weight of shape [200, 64] but the weight files hold [300, 64]", None),
        ("tensor missing from the weights", [f"model.init_from={x['dropped_tensor']}", src],
         "lack tensor model.layers.1.mlp.down_proj.weight", None),
        ("init_from does not exist", ["model.init_from=/nonexistent", src],
         "model.init_from='/nonexistent' is neither an existing path nor a preset", None),
        ("init_from is a plain file", [f"model.init_from={x['a_file']}", src], "is a file but not a .gguf file", None),
        ("init_from .gguf missing", [f"model.init_from={root / 'none.gguf'}", src], "none.gguf does not exist", None),
        ("init_from directory of nothing", [f"model.init_from={x['raw']}", src], "holds neither config.json", None),
        # tokenizer
        ("tokenizer.path missing", [*on_hf, f"tokenizer.path={root / 'no_such_tok'}"],
         f"tokenizer.path={root / 'no_such_tok'} does not exist", None),
        ("tokenizer.path without tokenizer.json", [*on_hf, f"tokenizer.path={x['no_tokenizer']}"],
         f"tokenizer.path={x['no_tokenizer']} holds no tokenizer.json", None),
        ("tokenizer larger than the embedding", [f"model.init_from={x['small_vocab']}", src],
         f"own tokenizer ({x['small_vocab']}) has 300 tokens but model.init_from={x['small_vocab']} has 250", None),
        ("data of a larger vocabulary", [f"model.init_from={hf}", f"data.sources=[{{path: {x['big_vocab_prefix']}}}]"],
         "was tokenised with a vocabulary of 1000 tokens but the model has 300", None),
        # config file
        ("YAML key that is a number", [], "config key 100 in section 'train' is not a name",
         _yaml(root, "numkey", "train:\n  steps: 6\n  100: 3\n")),
        ("YAML key 'on'", [], "config key True at the top level is not a name", _yaml(root, "onkey", "on: push\n")),
        ("config file in CP949", [], "cp949.yaml is not UTF-8",
         _yaml(root, "cp949", "# 학습 설정: 한국어 주석\ntrain:\n  steps: 6\n", "cp949")),
        ("config key typo", ["train.setps=3"], "unknown config key 'train.setps'; did you mean 'train.steps'", None),
        # values and relations
        ("lr NaN", ["optim.lr=.nan"], "optim.lr=nan must be a finite number", None),
        ("lr negative", ["optim.lr=-1e-4"], "optim.lr=-0.0001 must be a finite number of 0 or more", None),
        ("min_lr above lr", ["optim.schedule=cosine", "optim.min_lr=0.01"], "optim.min_lr=0.01 is above optim.lr=0.001",
         None),
        ("beta of 1", ["optim.betas=[0.9, 1.0]"], "optim.betas[1]=1.0 is outside [0, 1)", None),
        ("beta negative", ["optim.betas=[-0.1, 0.95]"], "optim.betas[0]=-0.1 is outside [0, 1)", None),
        ("eps zero", ["optim.eps=0"], "optim.eps=0 divides by zero", None),
        ("grad_clip negative", ["train.grad_clip=-1"], "train.grad_clip=-1.0 must be a finite norm", None),
        ("warmup longer than the run", ["optim.warmup_steps=7"], "optim.warmup_steps=7 is longer than train.steps=6",
         None),
        ("decay longer than the run", ["optim.schedule=wsd", "optim.decay_steps=5"],
         "optim.warmup_steps=2 + optim.decay_steps=5 is longer than train.steps=6", None),
        ("timeout zero", ["parallel.timeout_seconds=0"], "parallel.timeout_seconds=0 must be at least 1", None),
        # data
        ("duplicate eval names", [src, f"data.eval=[{{path: {prefix}, name: ko}}, {{path: {prefix}, name: ko}}]"],
         "data.eval has several sources named 'ko'", None),
        ("bad text_unit", [f"model.init_from={hf}", f"data.sources=[{{path: {x['raw']}, text_unit: paragraph}}]"],
         "text_unit='paragraph' is not valid; use one of blank_line, line, file", None),
        ("badly typed cleaning option", [f"model.init_from={hf}",
                                         f"data.sources=[{{path: {x['raw']}, cleaning: {{min_chars: many}}}}]"],
         "cleaning option min_chars='many' must be int", None),
        ("directory of unreadable files", [f"model.init_from={hf}", f"data.sources=[{{path: {x['unreadable']}}}]"],
         "holds no readable document", None),
        ("directory of unsupported files", [f"model.init_from={hf}", f"data.sources=[{{path: {x['only_other']}}}]"],
         "holds no file megakor reads", None),
        ("source path missing", ["data.sources=[{path: /nonexistent/raw.jsonl}]"],
         "input /nonexistent/raw.jsonl matches no file or directory", None),
        ("raw data without a tokenizer", [raw_src], "is not a preprocessed prefix, and there is no tokenizer", None),
        ("holdout larger than the source", [f"data.sources=[{{path: {prefix}, holdout_documents: 50}}]"],
         "has 50 documents; holdout_documents=50 must be smaller", None),
        # outputs
        ("checkpoint.dir is a file", [src, f"checkpoint.dir={x['a_file']}"],
         f"checkpoint.dir={x['a_file']} is a file, not a directory", None),
        ("checkpoint.dir under a file", [src, f"checkpoint.dir={x['a_file']}/ck"],
         f"checkpoint.dir={x['a_file']}/ck cannot be created", None),
        ("checkpoint.dir not writable", [src, "checkpoint.dir=/proc/megakor-ck"],
         "checkpoint.dir=/proc/megakor-ck is not writable", None),
        ("tensorboard dir under a file", [src, f"logging.tensorboard_dir={x['a_file']}/tb"],
         f"logging.tensorboard_dir={x['a_file']}/tb cannot be created", None),
        ("no room for a checkpoint", [src, "model.init_from=llama3.1-70b"],
         "GB free but one checkpoint of this model takes about", None),
        # layout
        ("tensor parallelism of 3", [src, "parallel.tensor=3"], "cannot be split into parallel.tensor=3", None),
    ]


def _argv(x, tmp: Path, overrides: list[str], config: str | None) -> list[str]:
    defaults = [f"data.sources=[{{path: {x['prefix']}}}]", f"checkpoint.dir={tmp / 'ck'}",
                f"logging.tensorboard_dir={tmp / 'tb'}", f"data.cache_dir={tmp / 'cache'}"]
    return [*defaults[:1], "--config", config or str(REPO / CONFIG), *defaults[1:], *overrides]


def test_every_bad_input_exits_2_in_one_sentence_before_any_weight_or_process_group(inputs, tmp_path, monkeypatch,
                                                                                    capsys):
    main = train_main()
    events: list[str] = []
    install(events.append, monkeypatch.setattr)
    table = cases(inputs)
    assert len(table) >= 25
    worst = 0.0
    for i, (name, overrides, sentence, config) in enumerate(table):
        argv = _argv(inputs, tmp_path / str(i), overrides, config)
        for world, rank in ((1, 0), (2, 0), (2, 1)):
            monkeypatch.setenv("WORLD_SIZE", str(world))
            monkeypatch.setenv("RANK", str(rank))
            start = time.perf_counter()
            code = main(argv)
            seconds = time.perf_counter() - start
            worst = max(worst, seconds)
            out, err = capsys.readouterr()
            assert code == 2, (name, world, rank, err[-2000:])
            assert events == [], (name, events)
            assert not dist.is_initialized()
            assert seconds < MAX_SECONDS, (name, seconds)
            if rank == 0:
                assert err.startswith("error: ") and err.count("\n") == 1 and sentence in err, (name, err)
            else:
                assert err == "", (name, err)  # the same mistake is reported once, by rank 0
        assert not (tmp_path / str(i) / "ck").exists() or name.startswith("checkpoint.dir")
    print(f"\n{len(table)} bad inputs, each refused on 1 rank and on both ranks of 2; slowest {worst:.2f} s")


@pytest.mark.parametrize("name", ["missing weight shard", "config file in CP949"])
def test_two_real_ranks_exit_2_and_report_once(inputs, tmp_path, name):
    _, overrides, sentence, config = next(c for c in cases(inputs) if c[0] == name)
    start = time.monotonic()
    outputs = launch(2, ["tests/train_probe.py", *_argv(inputs, tmp_path, overrides, config)], timeout=60)
    seconds = time.monotonic() - start
    assert [rc for rc, _ in outputs] == [2, 2], outputs
    text = "".join(out for _, out in outputs)
    assert "PROBE:" not in text, text  # no weight file opened, no process group started
    assert text.count(sentence) == 1 and text.count("error: ") == 1, text
    assert seconds < MAX_SECONDS, seconds
    print(f"\n{name}: both ranks exited 2 in {seconds:.1f} s")


def test_overrides_on_either_side_of_config_and_home_in_paths(inputs, tmp_path, monkeypatch, capsys):
    main = train_main()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("HOME", str(tmp_path))
    # Both sides are read: the sentence needs train.steps (before --config) and optim.warmup_steps (after).
    assert main(["train.steps=5", "--config", str(REPO / CONFIG), f"data.sources=[{{path: {inputs['prefix']}}}]",
                 "optim.warmup_steps=9"]) == 2
    assert capsys.readouterr().err == ("error: optim.warmup_steps=9 is longer than train.steps=5; the peak optim.lr "
                                       "would never be reached: use at most 5 warmup steps\n")
    from megakor.config import load_config

    cfg = load_config(REPO / CONFIG, ["checkpoint.dir=~/ck", "data.sources=[{path: ~/data/ko}]"])
    assert cfg.checkpoint.dir == f"{tmp_path}/ck" and cfg.data.sources == [{"path": f"{tmp_path}/data/ko"}]


INLINE_SENTENCE = "more than data.max_inline_preprocess_bytes=100 that a 2-process job preprocesses while its GPUs wait; " \
                  "preprocess it first with `sbatch --array=0-N slurm/preprocess.sh --input"


def test_raw_source_above_inline_size_refused_in_two_rank_job(inputs, tmp_path):
    """The raw source (~200 bytes) is above data.max_inline_preprocess_bytes=100: two real ranks exit 2 in
    preflight with the sentence naming the array job; one process, a source preprocessed into the cache
    already, and data.max_inline_preprocess_bytes=0 go on."""
    from megakor.config import ConfigError, load_config
    from megakor.data.blend import SourceSpec, resolve_source
    from megakor.train.preflight import preflight

    overrides = [f"model.init_from={inputs['hf']}", f"data.sources=[{{path: {inputs['raw']}}}]",
                 "data.max_inline_preprocess_bytes=100"]
    start = time.monotonic()
    outputs = launch(2, ["tests/train_probe.py", *_argv(inputs, tmp_path, overrides, None)], timeout=60)
    assert [rc for rc, _ in outputs] == [2, 2], outputs
    text = "".join(out for _, out in outputs)
    assert "PROBE:" not in text, text  # no weight file opened, no process group started
    assert text.count(INLINE_SENTENCE) == 1 and text.count("error: ") == 1, text
    assert f"--tokenizer {inputs['hf']} --output-prefix PREFIX` and give PREFIX as its path" in text, text
    assert time.monotonic() - start < MAX_SECONDS

    argv = _argv(inputs, tmp_path, overrides, None)
    cfg = load_config(argv[argv.index("--config") + 1], [argv[0], *argv[argv.index("--config") + 2:]])
    with pytest.raises(ConfigError, match=INLINE_SENTENCE.replace("`", ".").replace("(", r"\(")[:60]):
        preflight(cfg, 2)
    preflight(cfg, 1)  # one process preprocesses it as before
    cfg.data.max_inline_preprocess_bytes = 0  # no limit
    preflight(cfg, 2)
    cfg.data.max_inline_preprocess_bytes = 100
    resolve_source(SourceSpec.from_dict(cfg.data.sources[0]), str(inputs["hf"]), cfg.data.cache_dir, 0)
    preflight(cfg, 2)  # already in data.cache_dir: nothing left to preprocess at start-up

    # The command it names reproduces the source's own reading and cleaning settings.
    cfg.data.sources = [{"path": str(inputs["raw"]), "lang": "en", "text_unit": "line", "near_dup_threshold": 0.9}]
    with pytest.raises(ConfigError, match="--text-unit line --min-hangul-ratio 0.0 --near-dup-threshold 0.9 "
                                          "--output-prefix PREFIX"):
        preflight(cfg, 2)
    cfg.data.sources = [{"path": str(inputs["raw"]), "format": "chat"}]  # the array job reads text only
    with pytest.raises(ConfigError, match="run this source once in a 1-process job"):
        preflight(cfg, 2)
