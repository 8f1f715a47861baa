"""Stage 2 over torch.distributed (gloo on CPU, as CI runs it): the head after training is
bit-identical whether one process or two ran the perturbations (DESIGN.md §4)."""

import os

import pytest
import torch
import torch.distributed as dist

from compo.config import ZOConfig
from dist_run import start


def _worker(rank: int, world: int, rdzv: str, model_dir: str, out: str, support: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compo.data import toy
    from compo.config import ToyDataConfig
    from compo.data.encode import encode_rows
    from compo.core.rundir import RunDir
    from compo.zo.trainer import ZOTrainer
    from oracles import LikelihoodOracle

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = toy.toy_dataset(ToyDataConfig(n_train=8, n_eval=1), seed=0)[0]
        items = encode_rows(rows, tok, 32, 16).items
        cfg = ZOConfig(m=40, chunk_size=6, radius=5e-3, sparsity="top_fraction", rho=0.05, skip_threshold=0.05,
                       gamma=0.5, max_steps=3, checkpoint_every=0, acceptance_check=True, support=support,
                       support_k=4)
        tr = ZOTrainer(model, cfg, 5, LikelihoodOracle(), pad_id=0)
        totals = tr.train(items, rows, RunDir(os.path.join(out, f"run{world}")), progress=False)
        if rank == 0:
            torch.save({"w": tr.w, "taken": totals["steps_taken"]}, os.path.join(out, f"head{world}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("support", ["all", "topk"])
def test_one_and_two_processes_give_the_same_head(tmp_path, toy_reference, support):
    model, tok = toy_reference
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for world in (1, 2):
        start(_worker, (world, str(tmp_path / f"rdzv{world}"), str(tmp_path / "model"), str(tmp_path), support), world)
    one, two = torch.load(tmp_path / "head1.pt"), torch.load(tmp_path / "head2.pt")
    assert one["taken"] > 0 and one["taken"] == two["taken"]
    assert one["w"].numpy().tobytes() == two["w"].numpy().tobytes()
    assert not torch.equal(one["w"], model.get_output_embeddings().weight.float())
