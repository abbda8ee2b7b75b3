"""Where a model runs and in which number format: the device, the weights' dtype, the training
precision (bf16 where the hardware multiplies it natively), and the CPU facts those choices read."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import DTYPE_CHOICES
from ..errors import LorakitError

__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "native_bf16", "resolve_precision", "physical_cores"]

DTYPES = {name: getattr(torch, name) for name in DTYPE_CHOICES if name != "auto"}  # config.DTYPE_CHOICES, as torch dtypes


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise LorakitError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LorakitError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [{k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
            for block in text.split("\n\n") if block.strip()]


def _cpu_flags() -> set[str]:
    cpus = _cpuinfo()
    return set(cpus[0].get("flags", "").split()) if cpus else set()


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's matmul units, so more threads do not help)."""
    cores = {(info.get("physical id"), info["core id"]) for info in _cpuinfo() if "core id" in info}
    return len(cores) or os.cpu_count() or 1


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX-BF16 (there bf16 matmuls run ~2.5× faster than fp32; elsewhere they
    are emulated and many times slower). ``LORAKIT_CPU_BF16=0`` or ``1`` overrides the CPU check."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    forced = os.environ.get("LORAKIT_CPU_BF16", "").strip()
    if forced not in ("", "0", "1"):
        raise LorakitError(f"LORAKIT_CPU_BF16 must be 0 (fp32 on this CPU) or 1 (bf16), or unset to detect it; "
                           f"got {forced!r}")
    if forced:
        return forced == "1"
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device, quantize: str = "none") -> str:
    """Training precision. auto: bf16 autocast where the device multiplies bf16 natively (CUDA with
    bf16, CPUs with AVX512-BF16/AMX), fp32 elsewhere; a 4-bit base on CPU stays fp32 (its kernels
    compute in fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cpu" and quantize != "none":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp32"


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto: bf16 on a CUDA GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slow on most CPUs).
    A torch dtype is taken as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise LorakitError(f"dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
