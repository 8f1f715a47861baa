"""Head matmul throughput for ``bench_zo.py``: the candidates' ``(s h) z^T`` products against the
device's dense bf16 peak and its memory bandwidth.

A projected perturbation's head work is one (T x k)(k x V) product, a full one (T x H)(H x V);
2 T k V floating-point operations. :func:`head_matmul_seconds` times those products batched as a
chunk of ``c`` candidates (``torch.bmm``, the GPU path of ``compo.zo.head.candidate_logps``) in
a given dtype; :func:`head_tflops` turns candidates per second (a timed chunk's, or a step's
perturbation rate) into the head FLOP/s achieved, so both can be set against the peak. :func:`peak_tflops` is the vendor's dense (no sparsity) bf16 tensor-core peak for the GPUs
below, or ``--peak-tflops``.

The product does ~T FLOPs per byte of z it reads (2 T k V FLOPs, 2 k V bytes in bf16); with T ~ 100
scored tokens that is below the ~200 FLOP/byte an H100 or H200 needs to be compute-bound: the head
matmul is memory-bound. So it is also set against
the memory bandwidth: :func:`head_matmul_bytes` is what one chunk's product moves (its inputs
read once plus its output written once), :func:`peak_gbs` the data sheet's bandwidth, or
``--peak-gbs``.
"""

from __future__ import annotations

import time

import torch

#: Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a substring of the
#: device name (the first that matches wins: "H100 PCIe" before "H100"); ``--peak-tflops`` for any other.
BF16_PEAK_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 PCIe", 756.5), ("H100 NVL", 835.5),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0),
                    ("L4", 121.0))

#: Memory bandwidths (GB/s, 1e9 bytes/s) from the vendors' data sheets, matched as
#: :data:`BF16_PEAK_TFLOPS` (a substring of the device name, the first that matches wins). The
#: A100's depends on the memory size and form factor, so only the names that tell it are listed;
#: another A100 (or any unlisted GPU) gets None: ``--peak-gbs``.
PEAK_BANDWIDTH_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0),
                      ("A100-SXM4-80GB", 2039.0), ("A100-SXM-80GB", 2039.0), ("A100 80GB PCIe", 1935.0),
                      ("A100-SXM4-40GB", 1555.0), ("A100-PCIE-40GB", 1555.0), ("L40S", 864.0),
                      ("L40", 864.0), ("L4", 300.0), ("A10G", 600.0), ("RTX 4090", 1008.0))

#: Timed products per call of :func:`head_matmul_seconds` unless ``reps`` is given: CUDA events
#: resolve ~microseconds, so many; the CPU's wall clock over a slow product, few.
GPU_REPS, CPU_REPS = 200, 10


def sync(device: torch.device | str) -> None:
    """Wait for ``device``'s queued work (a CUDA device; a no-op otherwise), so a clock reading
    after it covers that work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _by_name(device: torch.device, table) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in table if key in name), None)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: ``override`` when given, else from the table
    for a known CUDA GPU, else None (CPUs, unlisted GPUs)."""
    return override if override is not None else _by_name(device, BF16_PEAK_TFLOPS)


def peak_gbs(device: torch.device, override: float | None = None) -> float | None:
    """The device's memory bandwidth in GB/s: ``override`` when given, else from
    :data:`PEAK_BANDWIDTH_GBS` for a known CUDA GPU, else None (CPUs, unlisted GPUs)."""
    return override if override is not None else _by_name(device, PEAK_BANDWIDTH_GBS)


def head_flops(n_tokens: int, width: int, v: int) -> int:
    """Floating-point operations of one candidate's (T x width)(width x V) product."""
    return 2 * n_tokens * width * v


def head_matmul_bytes(c: int, n_tokens: int, width: int, v: int, itemsize: int = 2) -> int:
    """Bytes ``c`` candidates' (T x width)(width x V) products move at least: both inputs read
    once and the (T x V) outputs written once, ``itemsize`` bytes an element (bf16: 2)."""
    return c * (n_tokens * width + v * width + n_tokens * v) * itemsize


def head_tflops(candidates_per_s: float, n_tokens: int, width: int, v: int) -> float:
    """Head TFLOP/s at ``candidates_per_s`` (T x width)(width x V) products a second."""
    return candidates_per_s * head_flops(n_tokens, width, v) / 1e12


def fraction(achieved: float, peak: float | None) -> float | None:
    """``achieved / peak``, or None without a (non-zero) peak."""
    return None if not peak else achieved / peak


def head_matmul_seconds(device: torch.device, c: int, n_tokens: int, width: int, v: int,
                        dtype: torch.dtype = torch.bfloat16, reps: int | None = None) -> float:
    """Seconds of one ``torch.bmm`` of (c, T, width) by (c, width, V) in ``dtype`` on ``device``:
    the mean over ``reps`` products (default :data:`GPU_REPS` on a GPU, timed with CUDA events
    after 10 warm-up products; :data:`CPU_REPS` elsewhere, on the wall clock after one)."""
    gen = torch.Generator(device=device).manual_seed(0)
    hs = torch.randn((c, n_tokens, width), generator=gen, device=device).to(dtype)
    z = torch.randn((c, v, width), generator=gen, device=device).to(dtype)
    out = torch.empty((c, n_tokens, v), dtype=dtype, device=device)
    zt = z.transpose(1, 2)
    if device.type == "cuda":
        reps = GPU_REPS if reps is None else reps
        for _ in range(10):
            torch.bmm(hs, zt, out=out)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        for _ in range(reps):
            torch.bmm(hs, zt, out=out)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    reps = CPU_REPS if reps is None else reps
    torch.bmm(hs, zt, out=out)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.bmm(hs, zt, out=out)
    return (time.perf_counter() - t0) / reps

