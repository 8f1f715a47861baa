"""Seeded perturbations: z_i is a pure function of (run seed, step, index), so any process
can regenerate any perturbation and only votes need to travel (DESIGN.md §4)."""

from __future__ import annotations

import hashlib

import torch

_MASK63 = (1 << 63) - 1


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
                 device: torch.device | str = "cpu"):
        if distribution not in ("gaussian", "sphere"):
            raise ValueError(f"unknown perturbation distribution '{distribution}', allowed: gaussian, sphere")
        self.run_seed, self.shape, self.radius, self.distribution = run_seed, tuple(shape), radius, distribution
        self.device = torch.device(device)
        self._gen = torch.Generator(device=self.device)

    def draw(self, step: int, indices: range | list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Raw N(0, 1) draws, shape (len(indices), *shape), fp32."""
        n = len(indices)
        if out is None:
            out = torch.empty((n, *self.shape), dtype=torch.float32, device=self.device)
        for j, i in enumerate(indices):
            self._gen.manual_seed(perturbation_seed(self.run_seed, step, i))
            torch.randn(self.shape, generator=self._gen, out=out[j])
        return out[:n]

    def scales(self, z: torch.Tensor) -> torch.Tensor:
        """(n,) factors s_i with candidate = W + s_i z_i, and the estimator uses s_i z_i / r."""
        if self.distribution == "gaussian":
            return torch.full((z.shape[0],), self.radius, device=z.device)
        return self.radius / z.flatten(1).norm(dim=1)
