"""Head matmul throughput for ``bench_zo.py``: the candidates' ``(s h) z^T`` products against the
device's dense bf16 peak.

A projected perturbation's head work is one (T x k)(k x V) product, a full one (T x H)(H x V);
2 T k V floating-point operations. :func:`head_matmul_tflops` times those products batched as a
chunk of ``c`` candidates (``torch.bmm``, the GPU path of ``compo.zo.head.candidate_logps``) in
a given dtype. :func:`step_tflops` turns a step's perturbations per second into the head
FLOP/s it achieved, so a step can be set against the peak too. :func:`peak_tflops` is the
vendor's dense (no sparsity) bf16 tensor-core peak for the GPUs below, or ``--peak-tflops``.
"""

from __future__ import annotations

import time

import torch

#: Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the
#: device name (the first that matches wins: "H100 PCIe" before "H100"); ``--peak-tflops`` for any other.
BF16_PEAK_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0),
                    ("L4", 121.0))


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: ``override`` when given, else from the table
    for a known CUDA GPU, else None (CPUs, unlisted GPUs)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def head_flops(n_tokens: int, width: int, v: int) -> int:
    """Floating-point operations of one candidate's (T x width)(width x V) product."""
    return 2 * n_tokens * width * v


def step_tflops(perturbations_per_s: float, n_tokens: int, width: int, v: int) -> float:
    """Head TFLOP/s a step achieved: its perturbation rate times one candidate's product."""
    return perturbations_per_s * head_flops(n_tokens, width, v) / 1e12


def head_matmul_tflops(device: torch.device, c: int, n_tokens: int, width: int, v: int,
                       dtype: torch.dtype = torch.bfloat16, reps: int = 10) -> float:
    """TFLOP/s of ``torch.bmm`` of (c, T, width) by (c, width, V) in ``dtype`` on ``device``
    (one warm-up, then the mean of ``reps`` products)."""
    gen = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn((c, n_tokens, width), generator=gen, device=device).to(dtype)
    z = torch.randn((c, v, width), generator=gen, device=device).to(dtype)
    out = torch.empty((c, n_tokens, v), dtype=dtype, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.bmm(hs, z.transpose(1, 2), out=out)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.bmm(hs, z.transpose(1, 2), out=out)
    sync()
    seconds = (time.perf_counter() - t0) / reps
    return c * head_flops(n_tokens, width, v) / seconds / 1e12
