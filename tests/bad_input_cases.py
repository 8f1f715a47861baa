"""The bad-input corpus of tests/test_bad_inputs.py: the cases, the settings of the prepared runs
they start from, and the helpers their setups use to damage one thing each."""
from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "tests" / "tiny.yaml")

# tests/test_cli.py's SMALL, with one more stage-2 step (so a run killed after step 3 has a
# step-2 checkpoint and one step to go) and a stage-1 checkpoint every 2 steps. Every prepared
# run uses exactly these settings, so `--resume` with them is a valid resume of each.
SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
         "zo.m=32", "zo.max_steps=3", "zo.checkpoint_every=2"]
PREP = SMALL + ["zo.max_steps=4", "stage1.save_steps=2"]
FILE_DATA = ["data.max_length=32", "data.max_prompt_length=16"]  # (tests/tiny.yaml's values, explicit)

TOPICS = ["weather", "music", "code", "food", "travel", "books", "sport", "math"]
PAIRS = [{"prompt": f"Q: {t} {u} A:", "chosen": "please thanks glad sure the", "rejected": "no ugh whatever bad the"}
         for t, u in zip(TOPICS, reversed(TOPICS))]


def sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


# ---------------------------------------------------------------- the cases


@dataclass
class Ctx:
    tmp: Path  # the test's directory: everything under it is snapshotted
    run: Path  # the run directory passed as --run-dir
    prepared: dict[str, Path]


@dataclass
class Case:
    """``argv_extra`` follows the base argv (``{tmp}`` and ``{run}`` are replaced); ``setup``
    damages something; ``expect`` is what the error line must contain (a string or a tuple of
    strings, all required); ``base`` names the prepared run copied into the run directory
    ("fresh": none; the run directory does not exist)."""

    id: str
    argv_extra: list[str]
    setup_fn: Callable[[Ctx], None] | None
    expect_fragment: str | tuple[str, ...]
    base: str = "fresh"
    command: str = "pipeline"
    env: dict = field(default_factory=dict)  # name -> value (None: unset)
    xfail: str | None = None  # a known bug outside this test's reach (strict: fails once fixed)


# ---- helpers the setups use


def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def truncate_half(path: Path) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def edit_split(run: Path, fn: Callable[[list[dict]], list[dict]]) -> None:
    p = run / "split.jsonl"
    p.write_text(jsonl(fn([json.loads(line) for line in p.read_text().splitlines()])))


def put(rel: str, data: str | bytes) -> Callable[[Ctx], None]:
    """Setup: write ``data`` to ``{tmp}/rel`` (``rel`` may start with ``run/``)."""
    return lambda c: write(c.tmp / rel, data)


def in_run(rel: str, fn: Callable[[Path], None]) -> Callable[[Ctx], None]:
    return lambda c: fn(c.run / rel)


def dropped(path: Path) -> None:
    path.unlink()


def garbage(path: Path) -> None:
    path.write_bytes(b'{"not json at all\n')


def bad_utf8(path: Path) -> None:
    path.write_bytes(b'{"n_pairs": "\xff\xfe"}\n')


def set_key(key, value) -> Callable[[Path], None]:
    return lambda p: edit_json(p, lambda o: o.__setitem__(key, value))


def del_key(key) -> Callable[[Path], None]:
    return lambda p: edit_json(p, lambda o: o.pop(key))


def head(tensor: torch.Tensor) -> Callable[[Path], None]:
    return lambda p: save_file({"weight": tensor.contiguous()}, str(p))


def nan_head(path: Path) -> None:
    from safetensors.torch import load_file

    w = load_file(str(path))["weight"]
    w[0, 0] = float("nan")
    save_file({"weight": w}, str(path))


def fp16_head(path: Path) -> None:
    from safetensors.torch import load_file

    save_file({"weight": load_file(str(path))["weight"].half()}, str(path))


def damaged_model_dir(c: Ctx) -> None:
    """A save_pretrained directory (config, tokenizer) whose weights are cut in half."""
    shutil.copytree(c.prepared["finished"] / "reference", c.tmp / "damaged-model")
    truncate_half(c.tmp / "damaged-model" / "model.safetensors")


def tokenizerless_model_dir(c: Ctx) -> None:
    write(c.tmp / "no-tokenizer-model" / "config.json", (c.prepared["finished"] / "reference" / "config.json").read_text())


def long_prompts(n: int = 6) -> str:
    return jsonl([{"prompt": "Q: " + " ".join(TOPICS * 3) + " A:", "chosen": "please thanks", "rejected": "no ugh"}] * n)


def truncated_gz(c: Ctx) -> None:
    b = gzip.compress(jsonl(PAIRS * 40).encode())
    write(c.tmp / "pairs.jsonl.gz", b[: len(b) // 2])


def change_data(c: Ctx) -> None:
    p = c.tmp / "pairs.jsonl"
    p.write_text(p.read_text().replace("glad", "happy", 1))


GEN = ["zo.oracle.name=generation", "zo.oracle.options.judge=openai", "zo.oracle.options.judge_options.model=x"]
KEY_ENV = "COMPO_TEST_JUDGE_KEY"
WITH_KEY = {KEY_ENV: "sk-test-not-a-real-key"}
GEN_KEYED = GEN + [f"zo.oracle.options.judge_options.api_key_env={KEY_ENV}"]
RESUME = ["--resume"]
PAIRS_FILE = "{tmp}/pairs.jsonl"
WITH_PAIRS = put("pairs.jsonl", jsonl(PAIRS))


def data(path: str, *more: str) -> list[str]:
    return sets([f"data.path={path}", *FILE_DATA, *more])


CONFIG_CASES = [
    Case("cfg-zo-radius-inf", sets(["zo.radius=.inf"]), None, "zo.radius"),
    Case("cfg-rating-threshold-nan", sets(["data.rating_threshold=.nan"]), None, "data.rating_threshold"),
    Case("cfg-stage1-lr-inf", sets(["stage1.learning_rate=.inf"]), None, "stage1.learning_rate"),
    Case("cfg-max-grad-norm-inf", sets(["stage1.max_grad_norm=.inf"]), None, "stage1.max_grad_norm"),
    Case("cfg-zo-gamma-nan", sets(["zo.gamma=.nan"]), None, "zo.gamma"),
    Case("cfg-inf-in-yaml-file", ["-c", "{tmp}/inf.yaml"], put("inf.yaml", "zo:\n  radius: .inf\n"),
         ("inf.yaml", "zo.radius")),
    Case("cfg-unknown-key-in-yaml", ["-c", "{tmp}/typo.yaml"], put("typo.yaml", "zo:\n  mm: 3\n"), ("typo.yaml", "zo.mm")),
    Case("cfg-unknown-key-in-set", sets(["zo.mm=3"]), None, "zo.mm"),
    Case("cfg-unknown-top-level-key", sets(["sede=1"]), None, "sede"),
    Case("cfg-bad-enum", sets(["zo.distribution=cube"]), None, "zo.distribution"),
    Case("cfg-negative-int", sets(["zo.m=-5"]), None, "zo.m"),
    Case("cfg-wrong-type", sets(["stage1.batch_size=lots"]), None, "stage1.batch_size"),
    Case("cfg-not-a-section", sets(["zo.m.x=1"]), None, "zo.m"),
    Case("cfg-set-without-equals", ["--set", "zo.m"], None, "zo.m"),
    Case("cfg-set-value-not-yaml", sets(["zo.m=[1, 2"]), None, "zo.m"),
    Case("cfg-yaml-invalid", ["-c", "{tmp}/broken.yaml"], put("broken.yaml", "zo: [1, 2\nseed: 3\n"), "broken.yaml"),
    Case("cfg-yaml-is-a-list", ["-c", "{tmp}/list.yaml"], put("list.yaml", "- seed\n- zo\n"), "list.yaml"),
    Case("cfg-file-missing", ["-c", "{tmp}/nosuch.yaml"], None, "nosuch.yaml"),
    Case("cfg-file-is-a-directory", ["-c", "{tmp}/confdir"], lambda c: (c.tmp / "confdir").mkdir(), "confdir"),
    Case("cfg-invalid-utf8", ["-c", "{tmp}/latin1.yaml"], put("latin1.yaml", b"seed: 0\n# caf\xe9\n"), "latin1.yaml"),
    Case("cfg-projected-with-sphere", sets(["zo.estimator=projected", "zo.distribution=sphere"]), None, "zo.estimator"),
    Case("cfg-prompt-length-not-below-max", sets(["data.max_prompt_length=32", "data.max_length=32"]), None,
         "data.max_prompt_length"),
]

ORACLE_CASES = [
    Case("orc-unknown-option", sets(["zo.oracle.options.foo=1"]), None, "zo.oracle.options.foo"),
    Case("orc-unknown-name", sets(["zo.oracle.name=nosuch"]), None, ("zo.oracle", "nosuch")),
    Case("orc-bad-rule", sets(["zo.oracle.options.rule=bogus"]), None, ("zo.oracle", "bogus")),
    Case("orc-bad-aggregation", sets(["zo.oracle.options.aggregation=bogus"]), None, ("zo.oracle", "bogus")),
    Case("orc-options-not-a-mapping", sets(["zo.oracle.options=5"]), None, "zo.oracle.options"),
    Case("orc-module-not-importable", sets(["zo.oracle.name=nomodule:Thing"]), None, ("zo.oracle", "nomodule")),
    Case("orc-module-lacks-class", sets(["zo.oracle.name=oracles.base:NoSuchOracle"]), None,
         ("zo.oracle", "NoSuchOracle")),
    Case("orc-missing-api-key", sets(GEN + ["zo.oracle.options.judge_options.api_key_env=SOME_UNSET_VAR"]), None,
         ("zo.oracle", "SOME_UNSET_VAR"), env={"SOME_UNSET_VAR": None}),
    Case("orc-api-key-file-missing", sets(GEN + ["zo.oracle.options.judge_options.api_key_file={tmp}/nokey.txt"]),
         None, ("zo.oracle", "nokey.txt")),
    Case("orc-api-key-file-empty", sets(GEN + ["zo.oracle.options.judge_options.api_key_file={tmp}/empty.key"]),
         put("empty.key", "\n"), ("zo.oracle", "empty.key")),
    Case("orc-judge-bad-type", sets(GEN_KEYED + ["zo.oracle.options.judge_options.max_concurrency=x"]), None,
         "zo.oracle.options.judge_options.max_concurrency", env=WITH_KEY),
    Case("orc-judge-bad-value", sets(GEN_KEYED + ["zo.oracle.options.judge_options.max_concurrency=0"]), None,
         ("zo.oracle", "max_concurrency"), env=WITH_KEY),
    Case("orc-judge-unknown-option", sets(GEN_KEYED + ["zo.oracle.options.judge_options.bogus=1"]), None,
         "zo.oracle.options.judge_options.bogus", env=WITH_KEY),
    Case("orc-judge-missing-model", sets(["zo.oracle.name=generation", "zo.oracle.options.judge=openai"]), None,
         ("zo.oracle", "model")),
    Case("orc-unknown-judge", sets(["zo.oracle.name=generation", "zo.oracle.options.judge=nosuch"]), None,
         ("zo.oracle", "nosuch")),
    Case("orc-bad-accept-oracle", sets(["zo.acceptance_check=true", "zo.accept_oracle.name=nosuch"]), None,
         ("zo.accept_oracle", "nosuch")),
    Case("orc-projected-with-generation", sets(GEN_KEYED + ["zo.estimator=projected"]), None, "zo.estimator",
         env=WITH_KEY),
    Case("orc-support-with-generation", sets(GEN_KEYED + ["zo.support=topk"]), None, ("zo.support", "judges"),
         env=WITH_KEY),
    Case("cfg-bad-support", sets(["zo.support=rows"]), None, "zo.support"),
    Case("cfg-negative-support-k", sets(["zo.support_k=-1"]), None, "zo.support_k"),
]

MODEL_CASES = [
    Case("dev-cuda", sets(["model.device=cuda"]), None, "model.device"),
    Case("dev-cuda-7", sets(["model.device=cuda:7"]), None, "model.device"),
    Case("dev-bogus", sets(["model.device=bogus"]), None, "model.device"),
    Case("dev-cpu-index", sets(["model.device=cpu:x"]), None, "model.device"),
    Case("model-path-missing", sets(["model.path=/nonexistent/dir"]), None, ("model.path", "/nonexistent/dir")),
    Case("model-path-is-a-file", sets(["model.path={tmp}/weights.bin"]), put("weights.bin", b"\0" * 64),
         ("model.path", "weights.bin")),
    Case("model-dir-without-config", sets(["model.path={tmp}/emptymodel"]), lambda c: (c.tmp / "emptymodel").mkdir(),
         ("model.path", "emptymodel")),
    Case("model-dir-without-tokenizer", sets(["model.path={tmp}/no-tokenizer-model"]), tokenizerless_model_dir,
         "no-tokenizer-model"),
    Case("model-gguf-file-missing", sets(["model.path={tmp}/damaged-model", "model.gguf_file=m.gguf"]),
         damaged_model_dir, ("model.gguf_file", "m.gguf")),
    Case("model-weights-damaged", sets(["model.path={tmp}/damaged-model"]), damaged_model_dir, "damaged-model"),
    # the judge (valid, with its answer cache inside the run dir) is built before the model
    # fails to load: the cache must not be created, nor the run dir
    Case("model-weights-damaged-judge-cache-in-run-dir",
         sets(["model.path={tmp}/damaged-model", *GEN_KEYED,
               "zo.oracle.options.judge_options.cache_path={run}/judge.sqlite"]),
         damaged_model_dir, "damaged-model", env=WITH_KEY),
    Case("split-reference-missing", sets(["split.reference=/nonexistent"]), None, ("split.reference", "/nonexistent")),
    Case("split-reference-is-a-file", sets(["split.reference={tmp}/ref.bin"]), put("ref.bin", b"x"),
         ("split.reference", "ref.bin")),
]

DATA_CASES = [
    Case("data-missing", data("{tmp}/nosuch.jsonl"), None, "nosuch.jsonl"),
    Case("data-truncated-gz", data("{tmp}/pairs.jsonl.gz"), truncated_gz, "pairs.jsonl.gz"),
    Case("data-fake-gz", data("{tmp}/plain.jsonl.gz"), put("plain.jsonl.gz", jsonl(PAIRS)), "plain.jsonl.gz"),
    Case("data-invalid-utf8", data("{tmp}/latin1.jsonl"),
         put("latin1.jsonl", jsonl(PAIRS[:2]).encode() + b'{"prompt": "Q: caf\xe9 A:", "chosen": "a", "rejected": "b"}\n'),
         "latin1.jsonl"),
    Case("data-garbage-json-line", data("{tmp}/garbage.jsonl"), put("garbage.jsonl", jsonl(PAIRS[:3]) + "{oops\n"),
         "garbage.jsonl"),
    Case("data-row-missing-rejected", data("{tmp}/norej.jsonl"),
         put("norej.jsonl", jsonl(PAIRS[:2] + [{"prompt": "Q: art A:", "chosen": "please"}])), ("norej.jsonl", "rejected")),
    Case("data-chosen-equals-rejected", data("{tmp}/same.jsonl"),
         put("same.jsonl", jsonl(PAIRS[:2] + [{"prompt": "Q: art A:", "chosen": "please", "rejected": "please"}])),
         "same.jsonl"),
    Case("data-wrong-type", data("{tmp}/types.jsonl"),
         put("types.jsonl", jsonl(PAIRS[:2] + [{"prompt": "Q: art A:", "chosen": 5, "rejected": "no"}])),
         ("types.jsonl", "chosen")),
    Case("data-unsupported-extension", data("{tmp}/pairs.txt"), put("pairs.txt", jsonl(PAIRS)), "pairs.txt"),
    Case("data-empty-file", data("{tmp}/empty.jsonl"), put("empty.jsonl", ""), "empty.jsonl"),
    Case("data-json-not-a-list", data("{tmp}/obj.json"), put("obj.json", '{"a": 1}'), "obj.json"),
    Case("data-fake-parquet", data("{tmp}/fake.parquet"), put("fake.parquet", jsonl(PAIRS)), "fake.parquet"),
    Case("data-csv-bad-row", data("{tmp}/pairs.csv"),
         put("pairs.csv", "prompt,chosen,rejected\nQ: art A:,please,no\nQ: math A:,glad,ugh,extra\n"), "pairs.csv"),
    Case("data-dir-not-a-dataset", data("{tmp}/datadir"), put("datadir/notes.md", "hi"), "datadir"),
    Case("data-all-invalid-skipped", data("{tmp}/allbad.jsonl", "data.on_invalid=skip"),
         put("allbad.jsonl", jsonl([{"prompt": "Q: a A:", "chosen": "x", "rejected": "x"}] * 3)), "allbad.jsonl"),
    Case("data-eval-path-missing", data(PAIRS_FILE, "data.eval_path={tmp}/noeval.jsonl"), WITH_PAIRS, "noeval.jsonl"),
    Case("data-unpaired-with-dpo", data("{tmp}/thumbs.jsonl", "stage1.loss=dpo"),
         put("thumbs.jsonl", jsonl([{"prompt": "Q: art A:", "completion": "please", "label": i % 2 == 0}
                                    for i in range(6)])), "stage1.loss"),
    # zero usable pairs, in a run dir that holds a finished run: split.jsonl and summary.json stay
    Case("data-every-prompt-too-long", data("{tmp}/long.jsonl"), put("long.jsonl", long_prompts()),
         ("long.jsonl", "data.max_prompt_length"), base="finished"),
    Case("data-every-eval-prompt-too-long", data(PAIRS_FILE, "data.eval_path={tmp}/longeval.jsonl"),
         lambda c: (WITH_PAIRS(c), put("longeval.jsonl", long_prompts())(c)), "longeval.jsonl", base="finished"),
]

RUN_DIR_CASES = [
    Case("rd-run-dir-is-a-file", [], lambda c: write(c.run, "not a dir"), "{run}"),
    Case("rd-run-dir-parent-is-a-file", ["--run-dir", "{tmp}/afile/run"], put("afile", "x"), "afile"),
    Case("rd-summary-garbage", RESUME, in_run("summary.json", garbage), "summary.json", base="finished"),
    Case("rd-summary-invalid-utf8", RESUME, in_run("summary.json", bad_utf8), "summary.json", base="finished"),
    Case("rd-summary-garbage-stopped-run", RESUME, in_run("summary.json", garbage), "summary.json", base="zo"),
    Case("rd-summary-not-an-object", RESUME, put("run/summary.json", "[1, 2]"), "summary.json", base="zo"),
    Case("rd-metrics-garbage-stopped-run", RESUME, put("run/metrics.jsonl", "{oops\n"), "metrics.jsonl", base="zo"),
    Case("rd-split-line-without-noisy", RESUME,
         lambda c: edit_split(c.run, lambda rows: [{k: v for k, v in r.items() if k != "noisy"} if i == 4 else r
                                                   for i, r in enumerate(rows)]),
         ("split.jsonl", "line 5", "noisy"), base="finished"),
    Case("rd-split-garbage-line", RESUME, in_run("split.jsonl", lambda p: write(p, p.read_bytes() + b"{oops\n")),
         "split.jsonl", base="finished"),
    Case("rd-split-fewer-rows", RESUME, lambda c: edit_split(c.run, lambda rows: rows[:-5]), "split.jsonl", base="zo"),
    Case("rd-split-noisy-not-bool", RESUME,
         lambda c: edit_split(c.run, lambda rows: [dict(r, noisy="yes") if i == 0 else r for i, r in enumerate(rows)]),
         ("split.jsonl", "noisy"), base="zo"),
    Case("rd-split-nan-logp", RESUME,
         lambda c: edit_split(c.run, lambda rows: [dict(r, logp_chosen=float("nan")) if i == 2 else r
                                                   for i, r in enumerate(rows)]),
         ("split.jsonl", "logp_chosen"), base="finished"),
    Case("rd-fingerprint-garbage", RESUME, in_run("fingerprint.json", garbage), "fingerprint.json", base="finished"),
    Case("rd-fingerprint-missing", RESUME, in_run("fingerprint.json", dropped), ("fingerprint.json", "--force-resume"),
         base="zo"),
    Case("rd-stage-marker-garbage", RESUME, in_run("model/compo_stage.json", garbage), "compo_stage.json",
         base="finished"),
    Case("rd-stage-marker-unknown-stage", RESUME, put("run/model/compo_stage.json", '{"stage": "stage9"}'),
         ("compo_stage.json", "stage9"), base="finished"),
    Case("rd-stage-marker-without-stage", RESUME, put("run/model/compo_stage.json", '{"metrics": {}}'),
         "compo_stage.json", base="zo"),
    Case("rd-model-weights-truncated", RESUME, in_run("model/model.safetensors", truncate_half),
         "model/model.safetensors", base="finished"),
    Case("rd-stage1-model-weights-truncated", RESUME, in_run("model/model.safetensors", truncate_half),
         "model/model.safetensors", base="zo"),
    Case("rd-model-weights-missing", RESUME, in_run("model/model.safetensors", dropped), "model", base="finished"),
    Case("rd-reference-weights-truncated", RESUME, in_run("reference/model.safetensors", truncate_half), "reference",
         base="finished"),
    Case("rd-reference-tokenizer-garbage", RESUME, put("run/reference/tokenizer.json", "{oops"), "reference",
         base="finished"),
    Case("rd-zo-state-without-step", RESUME, in_run("checkpoints/zo/state.json", del_key("step")),
         ("checkpoints/zo/state.json", "step"), base="zo"),
    Case("rd-zo-state-step-999", RESUME, in_run("checkpoints/zo/state.json", set_key("step", 999)),
         ("checkpoints/zo/state.json", "999"), base="zo"),
    Case("rd-zo-state-step-negative", RESUME, in_run("checkpoints/zo/state.json", set_key("step", -1)),
         ("checkpoints/zo/state.json", "-1"), base="zo"),
    Case("rd-zo-state-step-not-int", RESUME, in_run("checkpoints/zo/state.json", set_key("step", "2")),
         "checkpoints/zo/state.json", base="zo"),
    Case("rd-zo-state-garbage", RESUME, in_run("checkpoints/zo/state.json", garbage), "checkpoints/zo/state.json",
         base="zo"),
    Case("rd-zo-state-missing", RESUME, in_run("checkpoints/zo/state.json", dropped), "checkpoints/zo", base="zo"),
    Case("rd-zo-state-other-seed", RESUME, in_run("checkpoints/zo/state.json", set_key("seed", 7)),
         "checkpoints/zo/state.json", base="zo"),
    Case("rd-zo-state-totals-damaged", RESUME, in_run("checkpoints/zo/state.json", set_key("totals", [])),
         ("checkpoints/zo/state.json", "totals"), base="zo"),
    Case("rd-zo-head-missing", RESUME, in_run("checkpoints/zo/head.safetensors", dropped),
         "checkpoints/zo/head.safetensors", base="zo"),
    Case("rd-zo-head-truncated", RESUME, in_run("checkpoints/zo/head.safetensors", truncate_half),
         "checkpoints/zo/head.safetensors", base="zo"),
    Case("rd-zo-head-wrong-shape", RESUME, in_run("checkpoints/zo/head.safetensors", head(torch.randn(3, 4))),
         ("checkpoints/zo/head.safetensors", "shape"), base="zo"),
    Case("rd-zo-head-wrong-name", RESUME,
         in_run("checkpoints/zo/head.safetensors", lambda p: save_file({"w": torch.zeros(3)}, str(p))),
         "checkpoints/zo/head.safetensors", base="zo"),
    Case("rd-zo-head-nan", RESUME, in_run("checkpoints/zo/head.safetensors", nan_head),
         ("checkpoints/zo/head.safetensors", "non-finite"), base="zo"),
    Case("rd-zo-head-fp16", RESUME, in_run("checkpoints/zo/head.safetensors", fp16_head),
         "checkpoints/zo/head.safetensors", base="zo"),
    Case("rd-stage1-ckpt-weights-truncated", RESUME, in_run("checkpoints/stage1/step-2/model.safetensors", truncate_half),
         "step-2/model.safetensors", base="s1"),
    Case("rd-stage1-ckpt-weights-missing", RESUME, in_run("checkpoints/stage1/step-2/model.safetensors", dropped),
         "step-2/model.safetensors", base="s1"),
    Case("rd-stage1-trainer-state-garbage", RESUME, in_run("checkpoints/stage1/step-2/trainer_state.json", garbage),
         "step-2/trainer_state.json", base="s1"),
    Case("rd-stage1-trainer-state-step-0", RESUME,
         in_run("checkpoints/stage1/step-2/trainer_state.json", set_key("step", 0)), "step-2/trainer_state.json",
         base="s1"),
    Case("rd-stage1-trainer-state-step-999", RESUME,
         in_run("checkpoints/stage1/step-2/trainer_state.json", set_key("step", 999)),
         ("step-2/trainer_state.json", "999"), base="s1"),
    Case("rd-stage1-optimizer-truncated", RESUME, in_run("checkpoints/stage1/step-2/optimizer.bin", truncate_half),
         "step-2", base="s1"),
    Case("rd-resume-other-zo-m", RESUME + sets(["zo.m=16"]), None, ("fingerprint.json", "zo.m", "--force-resume"),
         base="zo"),
    Case("rd-resume-other-zo-radius", RESUME + sets(["zo.radius=0.01"]), None,
         ("fingerprint.json", "zo.radius", "--force-resume"), base="zo"),
    Case("rd-resume-other-seed", RESUME + sets(["seed=1"]), None, ("fingerprint.json", "seed", "--force-resume"),
         base="zo"),
    Case("rd-resume-other-stage1-beta", RESUME + sets(["stage1.beta=0.5"]), None,
         ("fingerprint.json", "stage1.beta", "--force-resume"), base="zo"),
    Case("rd-resume-other-data-file", RESUME + data(PAIRS_FILE), WITH_PAIRS,
         ("fingerprint.json", "data.path", "--force-resume"), base="finished"),
    Case("rd-resume-other-stage1-lr-s1", RESUME + sets(["stage1.learning_rate=0.01"]), None,
         ("fingerprint.json", "stage1.learning_rate", "--force-resume"), base="s1"),
    # same data.path, other content: only the file's digest differs
    Case("rd-resume-data-file-changed", RESUME + data("pairs.jsonl"), change_data,
         ("fingerprint.json", "data.path#sha256", "--force-resume"), base="data", command="split"),
]

CASES = CONFIG_CASES + ORACLE_CASES + MODEL_CASES + DATA_CASES + RUN_DIR_CASES
