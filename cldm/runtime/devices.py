"""Device policy: which device and dtype a manager runs on ("auto" or what the user asked for, checked)."""

from __future__ import annotations

from pathlib import Path

import torch

from cldm.errors import InputError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible. Use --device cpu or auto.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device mps was asked for but Metal is not available. Use --device cpu or auto.")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm): there bf16 matmuls run
    at several times the fp32 rate; elsewhere PyTorch emulates them, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    words = set(flags.split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': fp16 on GPUs (half the memory, tensor cores); on the CPU bf16 where it is native (about twice as
    fast as fp32 there, pictures within a few levels of fp32: see the README's bench), fp32 elsewhere."""
    if name == "auto":
        if device.type in ("cuda", "mps"):
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose auto, {', '.join(DTYPES)}")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("This GPU has no bf16 support; use --dtype fp16.")
    return DTYPES[name]
