"""Seeded perturbations: z_i is a pure function of (run seed, step, index), so any process
can regenerate any perturbation and only votes need to travel (DESIGN.md §4)."""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from compo.zo.philox import PhiloxStream

_MASK63 = (1 << 63) - 1
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_LOCAL = threading.local()
POOL_MIN_NUMBERS = 1 << 16  # per draw: smaller CPU draws are made on the calling thread


def in_workers(workers: int, fn, threads_each: int = 1) -> None:
    """``fn(w)`` for w in 0..workers-1, each on its own thread of a process-wide pool (made
    once per shape) whose threads run torch ops on ``threads_each`` threads. With one thread
    each, what a worker computes does not depend on how many threads torch was given (MKL's
    sgemm, for one, picks its kernel by them)."""
    key = (workers, threads_each)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="compo-zo",
                                         initializer=torch.set_num_threads, initargs=(threads_each,))
    n = torch.get_num_threads()
    try:
        futures = [_POOLS[key].submit(fn, w) for w in range(workers)]
        wait(futures)  # all of them, even when one fails: none may still write into shared buffers
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(n)  # a pool thread's set_num_threads is also the default for new threads


@functools.cache
def _fill_chains() -> bool:
    """Whether this torch's CPU normal fill, called on blocks of 16s and then a last odd block,
    gives the numbers of one call (checked once, on a small draw)."""
    gen = torch.Generator().manual_seed(12345)
    whole = torch.randn((37, 7), generator=gen)  # tiles of 16 rows (112 numbers), then 5 rows
    gen.manual_seed(12345)
    tiled = torch.empty_like(whole)
    for a in range(0, 37, 16):
        PerturbationSource.fill(gen, tiled[a : a + 16])
    return torch.equal(whole, tiled)


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

    ``rng``: ``philox`` (the default), compo's Philox4x32-10 normals (compo/zo/philox.py), the
    same numbers on every device, keyed by all 64 bits of a perturbation's seed, drawn on a CPU
    by a numba kernel ~3x faster than torch's; ``torch``: plain ``torch.randn`` from a generator
    seeded per perturbation (mt19937 on the CPU, which keeps a seed's low 32 bits; Philox on CUDA:
    the two differ).

    ``gaussian``: z ~ N(0, I), the candidate is W + r z (the official code; std r per entry).
    ``sphere``: z / ||z||, the candidate is W + r z/||z|| (the paper's Algorithm 1).
    ``scale(z)`` gives the factor that turns a raw draw into the candidate's offset.
    """

    def __init__(self, run_seed: int, shape: tuple[int, ...], radius: float, distribution: str = "gaussian",
                 device: torch.device | str = "cpu", threads: int | None = None, rng: str = "philox"):
        if distribution not in ("gaussian", "sphere"):
            raise ValueError(f"unknown perturbation distribution '{distribution}', allowed: gaussian, sphere")
        if rng not in ("torch", "philox"):
            raise ValueError(f"unknown perturbation rng '{rng}', allowed: torch, philox")
        self.run_seed, self.shape, self.radius, self.distribution = run_seed, tuple(shape), radius, distribution
        self.rng = rng
        self.device = torch.device(device)
        if rng == "philox" and self.device.type == "mps":
            raise ValueError("zo.rng=philox needs float64 (its torch ops round sqrt through it), which mps lacks; "
                             "use zo.rng=torch")
        self._gen = torch.Generator(device=self.device)
        # torch's CPU randn runs on one core, so CPU draws are shared out over threads, one
        # generator each; every draw is seeded by its own index: the result is thread-count free
        n = threads if threads is not None else torch.get_num_threads()
        self.threads = max(1, n) if self.device.type == "cpu" else 1

    def _own_generator(self) -> torch.Generator:
        """The calling thread's CPU generator (one each: they are not safe to share), or the GPU's."""
        return _thread_generator(self.device) if self.device.type == "cpu" else self._gen

    def _stream(self, seed: int) -> torch.Generator | PhiloxStream:
        """The start of the stream for ``seed``: a Philox stream, or this thread's torch
        generator seeded with it."""
        if self.rng == "philox":
            return PhiloxStream(seed)
        return self._own_generator().manual_seed(seed)

    def generator(self, step: int, index: int) -> torch.Generator | PhiloxStream:
        """The stream of perturbation ``index`` of ``step``, at its start (see :meth:`fill`)."""
        return self._stream(perturbation_seed(self.run_seed, step, index))

    @staticmethod
    def fill(gen: torch.Generator | PhiloxStream, rows: torch.Tensor) -> None:
        """The next ``rows.numel()`` numbers of ``gen``'s stream into ``rows`` (contiguous)."""
        if isinstance(gen, PhiloxStream):
            gen.fill(rows)
        else:
            torch.randn(rows.shape, generator=gen, out=rows)

    def tiles_match(self, tile: int) -> bool:
        """Whether filling a draw ``tile`` rows at a time gives the one-call draw bit for bit.

        torch's CPU normal fill turns uniforms into normals in blocks of 16 (a last block of an
        odd size redrawn), so blocks of whole 16s, then a last one of 16 or more, chain exactly;
        checked once on a small draw, so a torch whose fill works otherwise loses only the block-by-block draw."""
        v, width = self.shape[0], math.prod(self.shape[1:])
        if self.rng == "philox":
            return True  # counter-based: any block is computed on its own
        if self.device.type != "cpu":
            return False
        if tile >= v:
            return True  # one fill call
        if (tile * width) % 16 or 0 < (v % tile) * width < 16:
            return False
        return _fill_chains()

    def draw(self, step: int, indices: range | list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Raw N(0, 1) draws, shape (len(indices), *shape), fp32."""
        n = len(indices)
        if out is None:
            out = torch.empty((n, *self.shape), dtype=torch.float32, device=self.device)
        seeds = [perturbation_seed(self.run_seed, step, i) for i in indices]  # here: hashing in a pool holds the GIL
        # small draws stay on this thread: handing them to a pool costs more than they take
        workers = max(1, min(self.threads, n)) if math.prod(self.shape) >= POOL_MIN_NUMBERS else 1

        def fill(w: int) -> None:
            for j in range(w, n, workers):
                self.fill(self._stream(seeds[j]), out[j])

        if self.device.type == "cpu" and workers > 1:
            in_workers(workers, fill)
        else:
            fill(0)
        return out[:n]

    def scales(self, z: torch.Tensor) -> torch.Tensor:
        """(n,) factors s_i with candidate = W + s_i z_i, and the estimator uses s_i z_i / r."""
        if self.distribution == "gaussian":
            return torch.full((z.shape[0],), self.radius, device=z.device)
        return self.radius / z.flatten(1).norm(dim=1)
