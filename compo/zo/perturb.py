"""Seeded perturbations: z_i is a pure function of (run seed, step, index), so any process
can regenerate any perturbation and only votes need to travel (DESIGN.md §4)."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_MASK63 = (1 << 63) - 1
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCAL = threading.local()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` draw threads, made once."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="compo-draw")
    return _POOLS[workers]


def _thread_generator(device: torch.device) -> torch.Generator:
    """This thread's own generator (generators are not safe to share across threads)."""
    if getattr(_LOCAL, "gen", None) is None:
        _LOCAL.gen = torch.Generator(device=device)
    return _LOCAL.gen


def perturbation_seed(run_seed: int, step: int, index: int) -> int:
    """A 63-bit seed for perturbation ``index`` of ``step``; stable across runs and machines."""
    digest = hashlib.blake2b(f"compo-zo:{run_seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


class PerturbationSource:
    """Draws standard-normal directions of a fixed shape for (step, index).

    ``gaussian``: z ~ N(0, I), the candidate is W + r z (the official code; std r per entry).
    ``sphere``: z / ||z||, the candidate is W + r z/||z|| (the paper's Algorithm 1).
    ``scale(z)`` gives the factor that turns a raw draw into the candidate's offset.
    """

    def __init__(self, run_seed: int, shape: tuple[int, ...], radius: float, distribution: str = "gaussian",
                 device: torch.device | str = "cpu", threads: int | None = None):
        if distribution not in ("gaussian", "sphere"):
            raise ValueError(f"unknown perturbation distribution '{distribution}', allowed: gaussian, sphere")
        self.run_seed, self.shape, self.radius, self.distribution = run_seed, tuple(shape), radius, distribution
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)
        # torch's CPU randn runs on one core, so CPU draws are shared out over threads, one
        # generator each; every draw is seeded by its own index: the result is thread-count free
        n = threads if threads is not None else torch.get_num_threads()
        self.threads = max(1, n) if self.device.type == "cpu" else 1

    def draw(self, step: int, indices: range | list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Raw N(0, 1) draws, shape (len(indices), *shape), fp32."""
        n = len(indices)
        if out is None:
            out = torch.empty((n, *self.shape), dtype=torch.float32, device=self.device)
        seeds = [perturbation_seed(self.run_seed, step, i) for i in indices]
        workers = max(1, min(self.threads, n))

        def fill(w: int, gen: torch.Generator) -> None:
            for j in range(w, n, workers):
                gen.manual_seed(seeds[j])
                torch.randn(self.shape, generator=gen, out=out[j])

        if workers == 1:
            fill(0, self._gen)
        else:
            list(_pool(workers).map(lambda w: fill(w, _thread_generator(self.device)), range(workers)))
        return out[:n]

    def scales(self, z: torch.Tensor) -> torch.Tensor:
        """(n,) factors s_i with candidate = W + s_i z_i, and the estimator uses s_i z_i / r."""
        if self.distribution == "gaussian":
            return torch.full((z.shape[0],), self.radius, device=z.device)
        return self.radius / z.flatten(1).norm(dim=1)
