"""Stage 1 under DDP (accelerate, gloo, 2 processes joined by a FILE rendezvous): the same seed and
global batch give the model one process gives, within the fp32 tolerance of docs/scaling.md
(the gradient mean is summed in another order), with rank 0 alone writing the run directory; a
run killed with N processes resumes with M (2 -> 1, 1 -> 2) to the uninterrupted model."""

from __future__ import annotations

import pytest
from torch.multiprocessing import ProcessExitedException

from compo.cli import main
from dist_run import argv, max_abs_diff, metrics, output, spawn, weights

TOL = 1e-6  # fp32 weights: max |difference| after these steps (measured 1.7e-7 for DDP; see docs/scaling.md)
BASE = ["data.toy.n_train=96", "data.toy.n_eval=32", "model.toy.sft_steps=40", "stage1.batch_size=4"]


def _close(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k, v in x.items():
            assert y[k] == pytest.approx(v, rel=TOL, abs=TOL) if isinstance(v, float) else y[k] == v, k


def test_ddp_two_processes_equal_one_within_tolerance(tmp_path):
    # 16 rows per step = 4 micro-batches of 4: one process accumulates 4, each of two accumulates 2
    sets = BASE + ["stage1.epochs=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(argv("train", one, sets + ["stage1.grad_accum=4"])) == 0
    spawn(2, argv("train", two, sets + ["stage1.grad_accum=2"]), tmp_path)
    assert (one / "split.jsonl").read_bytes() == (two / "split.jsonl").read_bytes()  # sharded scoring: exact
    w1, w2 = weights(one / "model" / "model.safetensors"), weights(two / "model" / "model.safetensors")
    ref = weights(one / "reference" / "model.safetensors")
    assert max_abs_diff(w1, ref) > 1e-3  # it trained
    assert max_abs_diff(w1, w2) <= TOL
    m1, m2 = metrics(one), metrics(two)
    assert len(m2) == 6  # rank 0 alone logs: each step once
    _close(m1, m2)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One process, 8 rows per step (2 micro-batches of 4), 18 steps, a checkpoint every 2."""
    run = tmp_path_factory.mktemp("s1") / "run"
    assert main(argv("train", run, BASE + ["stage1.grad_accum=2", "stage1.save_steps=2"])) == 0
    return run


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes(before, after, uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    sets = BASE + [f"stage1.grad_accum={2 // before}", "stage1.save_steps=2"]  # 8 rows per step either way
    with pytest.raises(ProcessExitedException) as killed:
        spawn(before, argv("train", run, sets), tmp_path, fault="kill:stage1.step:3")  # after step 3; saved at 2
    assert killed.value.signal_name == "SIGKILL"
    ckpt = run / "checkpoints" / "stage1" / "step-2"
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [f"random_states_{r}.pkl" for r in range(before)]
    if after == 1:
        assert main(argv("train", run, sets, resume=True, quiet=False)) == 0
        said = capsys.readouterr().out
    else:
        said = output(spawn(after, argv("train", run, sets, resume=True, quiet=False), tmp_path))
    assert (f"stage1: resumed from {ckpt} at step 2/18 with {after} process{'es' if after > 1 else ''}, "
            f"{before} saved it; 8 rows per step as before") in said
    w = weights(run / "model" / "model.safetensors")
    assert max_abs_diff(w, weights(uninterrupted / "model" / "model.safetensors")) <= TOL
    _close(metrics(uninterrupted), metrics(run))
    assert not (run / "checkpoints").exists()


def test_a_step_that_the_processes_cannot_share_is_refused():
    from compo.core.errors import UserError
    from compo.train.stage1_dist import check_rows

    assert check_rows("ckpt", 16, 4, 2) == 2 and check_rows("ckpt", 16, 4, 4) == 1
    with pytest.raises(UserError, match="16 rows \\(4 micro-batches .* which 3 processes cannot share evenly; "
                                        "resume with 1, 2, 4 processes"):
        check_rows("ckpt/trainer_state.json", 16, 4, 3)
    with pytest.raises(UserError, match="not a positive multiple"):
        check_rows("ckpt/trainer_state.json", 10, 4, 1)


@pytest.mark.parametrize("name, expect", [
    ("accelerate_fsdp.yaml", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
                              "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "ACCELERATE_MIXED_PRECISION": "bf16"}),
    ("accelerate_zero3.yaml", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                               "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true", "ACCELERATE_MIXED_PRECISION": "bf16"}),
])
def test_the_accelerate_configs_launch_what_docs_scaling_says(name, expect):
    """`accelerate launch --config_file configs/<name>` reads every key and sets the environment
    accelerate's Accelerator then reads; accumulation and clipping are left to compo (unset)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", f"configs/{name}", "-m", "compo.cli", "pipeline"])
    args, defaults, from_config = _validate_launch_command(args)
    section = defaults.fsdp_config or defaults.deepspeed_config
    assert set(section) <= {a.dest for a in parser._actions}  # no key accelerate would ignore
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join([*section, *(["mixed_precision"] if from_config else [])])
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    assert {k: env.get(k) for k in expect} == expect
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env
    assert args.num_processes == 8 and args.num_machines == 1
