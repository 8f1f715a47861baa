"""`compo config --from-trl`: TRL DPO/KTO/BCO configs into compo configs, and the key map's docs."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from compo.interop import from_trl, trl_map
from compo.cli import main
from compo.config import ConfigError, load_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "from_trl.md"

DPO_YAML = """\
model_name_or_path: path/to/sft
dataset_name: my/pairs
output_dir: runs/from-trl
loss_type: robust
beta: 0.05
label_smoothing: 0.1
learning_rate: 5e-7          # PyYAML reads this as a string; TRL's parser as a float
num_train_epochs: 2.0
max_steps: -1
per_device_train_batch_size: 4
gradient_accumulation_steps: 4
warmup_ratio: 0.05
lr_scheduler_type: constant_with_warmup
max_grad_norm: 0.5
max_length: 1024
max_prompt_length: 512
bf16: true
fp16: false
logging_steps: 10
save_steps: 100
seed: 7
precompute_ref_log_probs: true
reference_free: false
rpo_alpha: null
sync_ref_model: false
ref_model_mixup_alpha: 0.6
optim: adamw_torch
adam_epsilon: 1e-8
report_to: none
logging_dir: logs
dataloader_num_workers: 4
gradient_checkpointing: true
group_by_length: true
project: my-project
run_name: dpo-robust-7
hub_token: hf_NOT_A_REAL_TOKEN_123
"""


def _convert(tmp_path, text: str, name: str = "trl.yaml", extra: list[str] = ()) -> tuple[int, Path]:
    src, out = tmp_path / name, tmp_path / "compo.yaml"
    src.write_text(text)
    return main(["config", "--from-trl", str(src), "-o", str(out), *extra]), out


def test_a_trl_dpo_yaml_converts_into_a_config_compo_loads(tmp_path, capsys):
    rc, out = _convert(tmp_path, DPO_YAML)
    err = capsys.readouterr().err
    assert rc == 0, err
    cfg = load_config(out)
    s1 = cfg.stage1
    assert (s1.loss, s1.beta, s1.label_smoothing, s1.learning_rate) == ("robust", 0.05, 0.1, 5e-7)
    assert (s1.epochs, s1.max_steps, s1.batch_size, s1.grad_accum) == (2, None, 4, 4)
    assert (s1.warmup_ratio, s1.max_grad_norm, s1.mixed_precision) == (0.05, 0.5, "bf16")
    assert (s1.logging_steps, s1.save_steps) == (10, 100)
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.path) == (1024, 512, "my/pairs")
    assert (cfg.model.path, cfg.run_dir, cfg.seed) == ("path/to/sft", "runs/from-trl", 7)
    assert (s1.gradient_checkpointing, s1.group_by_length) == (True, True)
    assert (cfg.report_to, cfg.logging.project, cfg.logging.run_name) == ([], "my-project", "dpo-robust-7")
    # only the keys the file set are written; inert keys at TRL's defaults add nothing
    written = yaml.safe_load(out.read_text())
    assert set(written) == {"model", "data", "run_dir", "stage1", "seed", "report_to", "logging"}
    assert set(written["stage1"]) == {"loss", "beta", "label_smoothing", "learning_rate", "epochs", "batch_size",
                                      "grad_accum", "warmup_ratio", "max_grad_norm", "mixed_precision",
                                      "logging_steps", "save_steps", "group_by_length", "gradient_checkpointing"}
    assert written["logging"] == {"project": "my-project", "run_name": "dpo-robust-7"}
    assert "ignored TRL keys" in err and "(no effect on what compo trains; see docs/from_trl.md): logging_dir, dataloader_num_workers, hub_token\n" in err
    assert "warning: " + str(tmp_path / "trl.yaml") not in err  # nothing converted differently from TRL
    assert "hf_NOT_A_REAL_TOKEN_123" not in err + out.read_text()


def test_stdout_output_and_set_on_top(tmp_path, capsys):
    src = tmp_path / "trl.yaml"
    src.write_text("beta: 0.3\nloss_type: ipo\n")
    assert main(["config", "--from-trl", str(src), "--set", "zo.m=800", "--run-dir", "runs/x"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# compo run config converted from the TRL DPOConfig in")
    assert yaml.safe_load(text) == {"stage1": {"loss": "ipo", "beta": 0.3}, "zo": {"m": 800}, "run_dir": "runs/x"}


def test_a_kto_json_is_recognised_by_its_keys(tmp_path, capsys):
    trl = {"output_dir": "out", "beta": 0.2, "desirable_weight": 1.33, "undesirable_weight": 1.0,
           "learning_rate": 1e-6, "per_device_train_batch_size": 8, "max_length": 256, "max_prompt_length": 128,
           "precompute_ref_log_probs": False, "warmup_steps": 0.1, "use_cpu": True}
    rc, out = _convert(tmp_path, json.dumps(trl), "kto.json")
    assert rc == 0, capsys.readouterr().err
    assert out.read_text().startswith("# compo run config converted from the TRL KTOConfig")
    cfg = load_config(out)
    assert (cfg.stage1.loss, cfg.stage1.beta, cfg.stage1.learning_rate) == ("kto", 0.2, 1e-6)
    assert (cfg.stage1.kto.desirable_weight, cfg.stage1.kto.undesirable_weight) == (1.33, 1.0)
    assert (cfg.stage1.warmup_ratio, cfg.model.device, cfg.data.max_length) == (0.1, "cpu", 256)


def test_a_bco_config_needs_the_trainer_named_when_its_keys_are_common(tmp_path, capsys):
    text = "beta: 0.1\nmax_density_ratio: 5.0\nmin_density_ratio: 0.2\n"
    rc, out = _convert(tmp_path, text)
    assert rc == 0
    cfg = load_config(out)
    assert (cfg.stage1.loss, cfg.stage1.bco.udm_clip_min, cfg.stage1.bco.udm_clip_max) == ("bco", 0.2, 5.0)
    rc, out = _convert(tmp_path, "beta: 0.1\nper_device_train_batch_size: 2\n", extra=["--trl-trainer", "bco"])
    assert rc == 0 and load_config(out).stage1.loss == "bco"
    rc, _ = _convert(tmp_path, "loss_type: kto\n", extra=["--trl-trainer", "bco"])
    assert rc == 2
    assert "loss_type: a DPOConfig/KTOConfig key, but this is a BCOConfig" in capsys.readouterr().err


def test_keys_without_an_equivalent_fail_together_naming_each(tmp_path, capsys):
    bad = ("loss_type: exo_pair\nreference_free: true\nlr_scheduler_type: cosine\nnum_train_epochs: 1.5\n"
           "bf16: true\nfp16: true\nmax_completion_length: 128\nfoo_bar: 1\nzzz: 2\nhub_token: hf_SECRET_99\n"
           "model_init_kwargs: {token: hf_SECRET_98, revision: main}\n")
    rc, out = _convert(tmp_path, bad)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    lines = [ln for ln in err.splitlines() if ln.startswith("compo: error: ")]
    named = [re.match(r"compo: error: \S+: ([\w, ]+):", ln).group(1) for ln in lines]
    assert named == ["loss_type", "reference_free", "lr_scheduler_type", "num_train_epochs", "bf16",
                     "max_completion_length", "model_init_kwargs", "foo_bar, zzz"]
    assert "'exo_pair' has no compo equivalent; compo's paired losses: sigmoid, ipo, hinge, robust" in lines[0]
    assert "True has no compo equivalent (accepted: false)" in lines[1]
    assert "bf16 and fp16 are both true" in lines[4]
    assert "a mapping with keys token, revision has no compo equivalent" in lines[6]
    assert "unknown key(s)" in lines[7]
    assert "hf_SECRET_9" not in err


def test_value_conversions(tmp_path):
    conv = from_trl.convert
    assert conv({"warmup_steps": 10, "max_steps": 100}).config == {"stage1": {"warmup_ratio": 0.1, "max_steps": 100}}
    assert conv({"lr_scheduler_type": "constant", "warmup_ratio": 0.2}).config["stage1"]["warmup_ratio"] == 0.0
    assert conv({"save_strategy": "no", "save_steps": 500}).config == {"stage1": {"save_steps": 0}}
    assert conv({"loss_type": ["sigmoid"], "torch_dtype": "bfloat16"}).config == {
        "stage1": {"loss": "dpo"}, "model": {"dtype": "bfloat16"}}
    assert conv({"torch_dtype": "auto", "max_length": None, "precompute_ref_batch_size": 64}).config == {
        "split": {"batch_size": 64}}
    assert conv({"gradient_checkpointing": False, "group_by_length": None, "run_name": None, "project": "p"}).config == {
        "stage1": {"gradient_checkpointing": False}, "logging": {"project": "p"}}
    assert conv({"activation_checkpointing": True, "gradient_checkpointing": None}).config == {
        "stage1": {"gradient_checkpointing": True}}
    for src, key, what in (
        ({"warmup_steps": 10}, "warmup_steps", "give warmup_ratio, or max_steps"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "loss_type", "label smoothing applies to sigmoid and robust"),
        ({"loss_type": "bco_pair"}, "loss_type", "stage1.loss=bco"),
        ({"max_grad_norm": 0}, "max_grad_norm", "always clips"),
        ({"logging_steps": 0.1}, "logging_steps", "float ratios"),
        ({"save_strategy": "epoch"}, "save_strategy", "'steps' or 'no'"),
        ({"adam_beta1": 0.8}, "adam_beta1", "accepted: 0.9"),
        ({"ref_model_sync_steps": 8, "sync_ref_model": True}, "ref_model_sync_steps", "while sync_ref_model is not"),
        ({"label_smoothing": 0.1, "desirable_weight": 1.0}, "--from-trl", "DPOConfig (label_smoothing), KTOConfig"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing", "expected true or false"),
        ({"activation_checkpointing": True, "gradient_checkpointing": False}, "activation_checkpointing", "set one"),
    ):
        with pytest.raises(ConfigError) as e:
            conv(src)
        assert any(w.endswith(key) and what in m for w, m in e.value.problems), e.value.problems
    # an inert key only matters with its switch on
    assert conv({"ref_model_sync_steps": 8, "ref_model_mixup_alpha": 0.3}).config == {}


def test_lora_keys_follow_stage1_peft(tmp_path, capsys):
    src = {"use_peft": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"]}
    conv = from_trl.convert(src)
    assert conv.config == {"stage1": {"peft": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0,
                                               "target_modules": ["q_proj", "v_proj"]}}}
    assert conv.warnings == []
    from_trl.validate(conv, "x")
    assert from_trl.convert({"use_peft": False, "lora_r": 64}).config == {}
    # no lora_target_modules: TRL lets PEFT choose per architecture; compo takes all-linear and says so
    rc, out = _convert(tmp_path, "use_peft: true\nlora_r: 8\n")
    err = capsys.readouterr().err
    assert rc == 0, err
    assert load_config(out).stage1.peft.model_dump() == {"enabled": True, "r": 8, "alpha": 32.0, "dropout": 0.05,
                                                         "target_modules": "all-linear"}
    (line,) = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert line.startswith(f"warning: {tmp_path / 'trl.yaml'}: use_peft: true with lora_target_modules unset: "
                           "compo puts adapters on all-linear")


def test_a_value_compo_refuses_names_the_trl_key_and_the_set_flag_is_its_own(tmp_path, capsys):
    rc, _ = _convert(tmp_path, "beta: -1\n")
    assert rc == 2
    assert "beta (compo stage1.beta): Input should be greater than 0" in capsys.readouterr().err
    rc, _ = _convert(tmp_path, "beta: 0.2\n", extra=["--set", "stage1.beta=-2"])
    err = capsys.readouterr().err
    assert rc == 2 and ": stage1.beta: Input should be greater than 0" in err and "(compo" not in err
    rc, _ = _convert(tmp_path, "beta: 0.2\n", extra=["--config", "tests/tiny.yaml"])
    assert rc == 2 and "give compo keys with --set, not --config" in capsys.readouterr().err
    assert main(["config", "-o", str(tmp_path / "x.yaml")]) == 2
    assert "go with --from-trl FILE" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- beta\n")
    assert main(["config", "--from-trl", str(tmp_path / "list.yaml")]) == 2
    assert "must hold a mapping" in capsys.readouterr().err


def test_every_training_arguments_field_is_in_the_map():
    """Each TrainingArguments field of the installed transformers is mapped, inert or ignored,
    so a TRL config dumped with ``to_dict()`` never fails as unknown."""
    from transformers import TrainingArguments

    known = trl_map.keys()
    missing = [f.name for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in known]
    assert missing == []
    assert len(known) == len(trl_map.all_keys())  # no key listed twice


def test_the_docs_table_is_the_key_map():
    text = DOCS.read_text()
    start = text.index("-->\n", text.index("<!-- key map:")) + 4
    end = text.index("<!-- end key map -->")
    assert text[start:end] == from_trl.markdown_table()
