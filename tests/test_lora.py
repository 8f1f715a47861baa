"""LoRA stage 1 (stage1.peft) on the tiny toy model: learning, the adapter-disabled reference,
saving both ways, bit-identical resume, validation, and the pipeline through stage 2."""

import json
import math
import types

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

from compo.run import checks
from compo.train import lora  # noqa: E402
from compo.cli import main  # noqa: E402
from compo.config import PeftConfig, load_config  # noqa: E402
from compo.data.encode import encode_rows  # noqa: E402
from compo.core.errors import CheckpointError, UserError  # noqa: E402
from compo.scoring.logprobs import score_pairs  # noqa: E402
from compo.core.rundir import RunDir, read_jsonl  # noqa: E402
from compo.train.stage1 import Stage1Data, paired_objective, train_stage1  # noqa: E402

SMALL = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.epochs=1",
         "zo.m=32", "zo.max_steps=3", "zo.checkpoint_every=2"]
LORA = ["stage1.peft.r=8", "stage1.peft.dropout=0.1"]


def _copy(toy_reference):
    model = type(toy_reference[0])(toy_reference[0].config)
    model.load_state_dict(toy_reference[0].state_dict())
    return model.eval()


def _setup(run_dir, toy_reference, toy_pairs, steps, *extra):
    model, tok = _copy(toy_reference), toy_reference[1]
    enc = encode_rows(toy_pairs[0][:32], tok, 32, 16)
    ref = score_pairs(model, enc.items, 0, progress=False)
    cfg = load_config(None, [f"stage1.max_steps={steps}", "stage1.learning_rate=1e-2", "stage1.batch_size=8",
                             "stage1.warmup_ratio=0", f"run_dir={run_dir}", *LORA, *extra])
    return model, tok, cfg, Stage1Data(enc.items, torch.stack([ref.chosen, ref.rejected], 1)), enc


def test_lora_dpo_learns_keeps_the_head_and_saves_adapter_and_merged_model(tmp_path, toy_reference, toy_pairs):
    model, tok, cfg, data, enc = _setup(tmp_path, toy_reference, toy_pairs, 20)
    head = model.lm_head.weight.detach().clone()
    run = RunDir(tmp_path)
    train_stage1(model, tok, data, cfg, run, paired_objective(cfg, 0), progress=False)
    log = [r for r in read_jsonl(run.metrics) if r["stage"] == "stage1"]
    assert len(log) == 20
    # LoRA's B starts at zero: at step 1 the policy is exactly the reference
    assert log[0]["rewards/accuracies"] == 0.0 and log[0]["rewards/margins"] == 0.0
    assert abs(log[0]["loss"] - math.log(2)) < 1e-6
    # per epoch (4 steps of 8 = all 32 pairs): reward accuracy and margin rise from the first to the last
    acc = [sum(r["rewards/accuracies"] for r in log[i : i + 4]) / 4 for i in range(0, 20, 4)]
    margin = [sum(r["rewards/margins"] for r in log[i : i + 4]) / 4 for i in range(0, 20, 4)]
    assert acc[0] <= 0.5 and acc[-1] >= 0.75 and margin[-1] > margin[0] + 0.05, (acc, margin)
    # merged in place: a plain Llama again, with every parameter trainable and the head untouched
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model.lm_head.weight, head)
    live = score_pairs(model, enc.items, 0, progress=False)
    acc = float(((live.chosen - data.ref[:, 0]) > (live.rejected - data.ref[:, 1])).float().mean())
    assert acc > 0.75, acc
    # model/ is a plain HF model; it reloads with from_pretrained and gives the live log-probs
    assert not (run.model / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(run.model)
    again = score_pairs(reloaded, enc.items, 0, progress=False)
    assert torch.allclose(again.chosen, live.chosen, atol=1e-5, rtol=0)
    assert torch.allclose(again.rejected, live.rejected, atol=1e-5, rtol=0)
    # adapter/ on the base model, merged, gives the same model
    adapter = tmp_path / lora.ADAPTER_DIR
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["lora_alpha"] == 32.0 and "lm_head" not in conf["target_modules"]
    rebuilt = PeftModel.from_pretrained(_copy(toy_reference), adapter).merge_and_unload()
    via_adapter = score_pairs(rebuilt, enc.items, 0, progress=False)
    assert torch.allclose(via_adapter.chosen, live.chosen, atol=1e-5, rtol=0)
    assert torch.allclose(via_adapter.rejected, live.rejected, atol=1e-5, rtol=0)


def test_the_adapter_names_a_local_base_model_by_its_absolute_path(tmp_path, toy_reference, toy_pairs, monkeypatch):
    """model.path given relative to the working directory: adapter_config.json holds the absolute
    path, so the adapter loads on its own (AutoPeftModelForCausalLM) from another directory."""
    from peft import AutoPeftModelForCausalLM

    models, elsewhere = tmp_path / "models", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _copy(toy_reference).save_pretrained(models / "base")
    monkeypatch.chdir(models)
    model, tok, cfg, data, enc = _setup(tmp_path / "run", toy_reference, toy_pairs, 3, "model.path=base")
    train_stage1(model, tok, data, cfg, RunDir(tmp_path / "run"), paired_objective(cfg, 0), progress=False)
    adapter = tmp_path / "run" / lora.ADAPTER_DIR
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str((models / "base").resolve())
    monkeypatch.chdir(elsewhere)  # "base" means nothing here
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).merge_and_unload()
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), n
    # a hub name (no such local directory) is kept as given; the toy model's base is run_dir/reference
    run = RunDir("runs/x")
    assert lora.base_model_name(load_config(None, ["model.path=org/some-model"]), run) == "org/some-model"
    assert lora.base_model_name(load_config(None, []), run) == str((elsewhere / "runs/x/reference").resolve())


def test_only_adapters_train_and_the_reference_is_the_base_with_adapters_off(toy_reference, toy_pairs):
    base, tok = _copy(toy_reference), toy_reference[1]
    enc = encode_rows(toy_pairs[0][:8], tok, 32, 16)
    before = score_pairs(base, enc.items, 0, progress=False)
    pcfg = PeftConfig(r=4, dropout=0.0)
    expect = lora.adapter_shapes(base, pcfg)
    model = lora.wrap(base, pcfg, say=lambda _m: None)
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expect and len(trainable) == 2 * 14  # 7 projections x 2 layers, A and B each
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == sum(
        p.numel() for p in toy_reference[0].parameters())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)  # as after training: the adapters now change the outputs
    live = score_pairs(model, enc.items, 0, progress=False)
    assert not torch.allclose(live.chosen, before.chosen, atol=1e-3)
    with lora.reference(model):
        ref = score_pairs(model, enc.items, 0, progress=False)
    assert torch.equal(ref.chosen, before.chosen) and torch.equal(ref.rejected, before.rejected)
    assert torch.equal(score_pairs(model, enc.items, 0, progress=False).chosen, live.chosen)  # adapters back on
    with pytest.raises(TypeError):
        with lora.reference(toy_reference[0]):
            pass


def _checks_ws(cfg, model, run):
    return types.SimpleNamespace(cfg=cfg, model=model, run=run, resume=True, done_stage=None,
                                 stages=["stage1"], saved_split=None)


def test_resume_from_an_adapter_checkpoint_is_bit_identical(tmp_path, toy_reference, toy_pairs, monkeypatch):
    a, tok, cfg_a, data, _ = _setup(tmp_path / "a", toy_reference, toy_pairs, 6)
    train_stage1(a, tok, data, cfg_a, RunDir(tmp_path / "a"), paired_objective(cfg_a, 0), progress=False)
    # a run killed after its step-2 checkpoint: stop at step 4 with checkpoints kept
    b, tok, cfg_b, data, _ = _setup(tmp_path / "b", toy_reference, toy_pairs, 4, "stage1.save_steps=2")
    run_b = RunDir(tmp_path / "b")
    import compo.train.stage1 as s1

    with monkeypatch.context() as m:
        m.setattr(s1.RunDir, "drop_checkpoints", lambda self, name: None)
        train_stage1(b, tok, data, cfg_b, run_b, paired_objective(cfg_b, 0), progress=False)
    ckpt = run_b.checkpoints / "stage1" / "step-2" / "model.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:  # the adapter alone, not the frozen base
        assert set(f.keys()) == set(lora.adapter_shapes(_copy(toy_reference), cfg_b.stage1.peft))
    c, tok, cfg_c, data, _ = _setup(tmp_path / "b", toy_reference, toy_pairs, 6, "stage1.save_steps=2")
    checks.check_checkpoints(_checks_ws(cfg_c, c, run_b))  # start-up check: fits this stage1.peft
    other = load_config(None, [f"run_dir={tmp_path / 'b'}", "stage1.peft.r=4"])
    with pytest.raises(CheckpointError) as e:
        checks.check_checkpoints(_checks_ws(other, c, run_b))
    assert "model.safetensors" in str(e.value) and "shape" in str(e.value)
    train_stage1(c, tok, data, cfg_c, run_b, paired_objective(cfg_c, 0), resume=True, progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    for part in ("a", "b"):
        assert (tmp_path / part / lora.ADAPTER_DIR / "adapter_model.safetensors").exists()
    logs = [[r["loss"] for r in read_jsonl(tmp_path / p / "metrics.jsonl")] for p in ("a", "b")]
    assert logs[0] == logs[1] and len(logs[0]) == 6


def test_peft_not_installed_fails_before_any_work_naming_the_key_and_the_extra(tmp_path, capsys, monkeypatch):
    real = lora.importlib.util.find_spec
    monkeypatch.setattr(lora.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    run = tmp_path / "run"
    assert main(["pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(run), "--set", "stage1.peft.r=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compo: error: stage1.peft:") and "pip install compo[peft]" in err[0]
    assert not run.exists()
    # without stage1.peft, or with it switched off, peft is not needed
    lora.check_available(load_config(None, ["stage1.peft.enabled=false"]))
    lora.check_available(load_config(None, []))


@pytest.mark.parametrize("targets, message", [
    ("[nope_proj]", "matches no module of the model; its linear layers are named down_proj, gate_proj"),
    ("[q_proj, lm_head]", "selects the output layer lm_head, which stage 2 fine-tunes"),
    ("[embed_tokens]", "selects model.embed_tokens, whose weights are the output layer's (tied embeddings)"),
    ("[input_layernorm]", "selects model.layers.0.input_layernorm (LlamaRMSNorm), not a linear layer"),
    ("'model\\.layers\\.(0'", "is not a valid regular expression"),
])
def test_target_modules_that_do_not_fit_the_model_are_user_errors(tiny_model, targets, message):
    cfg = load_config(None, [f"stage1.peft.target_modules={targets}"])
    with pytest.raises(UserError) as e:
        lora.check_targets(cfg, tiny_model)
    assert e.value.where == "stage1.peft.target_modules" and message in e.value.what, e.value.what


def test_target_modules_select_names_suffixes_and_regexes(tiny_model):
    linear = {n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert set(lora.target_names(tiny_model, "all-linear")) == linear and len(linear) == 14
    assert lora.target_names(tiny_model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert lora.target_names(tiny_model, "q_proj") == lora.target_names(tiny_model, ["q_proj"])
    assert lora.target_names(tiny_model, r"model\.layers\.1\.mlp\..*_proj") == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    cfg = load_config(None, ["stage1.peft.target_modules=[q_proj, v_proj]"])
    lora.check_targets(cfg, tiny_model)
    model = lora.wrap(tiny_model, cfg.stage1.peft, say=lambda _m: None)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        lora.adapter_shapes(tiny_model, cfg.stage1.peft))


def test_pipeline_with_lora_runs_through_stage_2_and_full_training_drops_the_adapter(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pipeline", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for s in SMALL + LORA:
        args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "stage1: LoRA r=8 alpha=32 on 14 linear layers" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stage2"]["steps"] == 3 and "rewards/accuracies" in summary["stage1"]
    assert summary["model_stage"] == "stage2"
    final = AutoModelForCausalLM.from_pretrained(run / "model")
    reference = AutoModelForCausalLM.from_pretrained(run / "reference")
    base = AutoModelForCausalLM.from_pretrained(run / "reference")  # peft wraps (and merges into) it in place
    stage1 = PeftModel.from_pretrained(base, run / "adapter").merge_and_unload()
    body = {k: v for k, v in stage1.state_dict().items() if k != "lm_head.weight"}
    final_sd = final.state_dict()
    assert all(torch.equal(v, final_sd[k]) for k, v in body.items())  # stage 2 changed the head alone
    assert torch.equal(stage1.lm_head.weight, reference.lm_head.weight)  # LoRA never touched it
    assert not torch.equal(final_sd["lm_head.weight"], reference.lm_head.weight)
    # a later full-training stage 1 in the same run directory removes the stale adapter
    args = ["train", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for s in SMALL + ["stage1.max_steps=2"]:
        args += ["--set", s]
    assert main(args) == 0
    assert not (run / "adapter").exists() and (run / "model" / "config.json").exists()


def test_kto_with_lora_trains_the_adapters_and_saves_a_merged_model(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "-c", "tests/tiny.yaml", "--run-dir", str(run)]
    for s in SMALL + LORA + ["stage1.loss=kto", "stage1.max_steps=4"]:
        args += ["--set", s]
    assert main(args) == 0
    assert "stage1: LoRA r=8" in capsys.readouterr().out
    log = [r for r in read_jsonl(run / "metrics.jsonl") if r["stage"] == "stage1"]
    assert len(log) == 4 and log[0]["kl"] == 0.0  # policy == reference at step 1
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(run / "model")


def test_lora_under_fsdp_or_deepspeed_is_refused_before_any_work(monkeypatch):
    from compo.core.errors import UserError

    cfg = load_config(None, ["stage1.peft.r=4"])
    lora.check_available(cfg)  # DDP / one process: fine
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(var, "true")
        with pytest.raises(UserError, match="stage1.peft.*not supported yet"):
            lora.check_available(cfg)
        lora.check_available(load_config(None, []))  # full sharded training is not affected
        monkeypatch.delenv(var)
