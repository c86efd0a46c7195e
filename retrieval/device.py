"""Device and precision in one place.

Every other module asks this one which device to use and how to run a forward pass; no other file
tests ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from retrieval import settings

_THREADS_SET = False


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    precision: str  # "fp32" | "fp16" | "bf16"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    def autocast(self):
        """Autocast context for a forward pass: fp16/bf16 on CUDA, a no-op on CPU (fp32)."""
        if self.is_cuda and self.precision != "fp32":
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(device: str | torch.device | None = "auto", precision: str = "auto") -> DeviceConfig:
    """Resolve ``auto|cpu|cuda|cuda:N`` and ``auto|fp32|fp16|bf16``.

    ``auto`` picks CUDA when there is one, else CPU; precision ``auto`` is fp16 autocast on CUDA and
    fp32 on CPU. Asking for CUDA on a machine without one raises a clear error.
    """
    from retrieval.errors import LoupeError

    name = "auto" if device is None else str(device)
    if name == "auto":
        dev = torch.device("cuda" if cuda_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise LoupeError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
        if dev.type == "cuda" and not cuda_available():
            raise LoupeError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu")
        if dev.type not in ("cpu", "cuda"):
            raise LoupeError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if precision == "auto":
        precision = "fp16" if dev.type == "cuda" else "fp32"
    if precision not in ("fp32", "fp16", "bf16"):
        raise LoupeError(f"unknown precision {precision!r}: use auto, fp32, fp16 or bf16")
    if dev.type == "cpu":
        precision = "fp32"
        set_cpu_threads()
    return DeviceConfig(dev, precision)


def set_cpu_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads once: ``n``, else ``LOUPE_THREADS`` (read now), else all cores."""
    global _THREADS_SET
    if _THREADS_SET and n is None:
        return torch.get_num_threads()
    want = n or settings.threads() or (os.cpu_count() or 1)
    torch.set_num_threads(max(1, want))
    _THREADS_SET = True
    return want


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and a GPU is visible."""
    try:
        import faiss
    except ImportError:  # pragma: no cover
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def one_query_per_thread() -> None:
    """For a process whose threads each answer one query at a time (``loupe serve``, a Ray Serve replica):
    faiss's OpenMP teams and the BLAS libraries loaded so far (numpy's and faiss's OpenBLAS, through
    ``threadpoolctl``) to one thread each. A one-query search gains nothing from their threads, and idle BLAS
    threads spin on the cores torch's encoder passes need: a plain image query on a 2-core machine took
    40.0-52.0 ms with them, 25.2 ms without through Engine.search; over HTTP no gain was measured
    (benchmarks/RESULTS.md, issue 17 follow-up 5). Torch's own threads (``LOUPE_THREADS``) are left as they are."""
    import faiss
    import numpy  # noqa: F401 - loaded before the limit, so threadpoolctl sees its BLAS
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    threadpool_limits(1, user_api="blas")
