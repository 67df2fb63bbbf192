"""Process-level performance settings: the allocator, and the device and dtype models run with, chosen by
measurement and capability checks.

`configure_allocator` changes the whole process (glibc's malloc), so only entry points call it: the `curator` and
`classify` CLIs, once, before any model runs. Library functions (`classify.train.train`, `classify.evaluate.evaluate`,
...) never do; a program that calls them and runs large batches on a CPU can call it once itself. Why it exists, as
measured on the machine named in docs/BENCHMARKS.md ("Allocator and dtype, model only", `bench/allocator.py`: lite0,
fp32, channels_last, model only): with glibc as shipped every batch's activation buffers are large enough to be
`mmap`ed fresh and `munmap`ed on free, so each batch page-faults its whole working set again (55-60% of CPU time in
the kernel); with mmap disabled and trimming raised, freed memory is reused by the next batch: 3.1x the images per
second at batch 32, 3.6x at 64. jemalloc preloaded did not help there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from curator.core.errors import UsageError

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest value it accepts


def configure_allocator() -> str:
    """Stop glibc from returning big buffers to the kernel between batches; returns what was done.

    Process-wide and permanent (mallopt has no undo), so it belongs to entry points: the CLIs call it once before any
    model runs, and no library function calls it. Idempotent and harmless off glibc (returns a note instead).
    """
    if not sys.platform.startswith("linux"):
        return f"allocator unchanged ({sys.platform})"
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(libc_name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator unchanged (no glibc mallopt)"
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return "glibc: mmap off, trim threshold 2 GiB" if ok else "allocator unchanged (mallopt refused)"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16); emulated bf16 is far slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@dataclass(frozen=True)
class Runtime:
    """Where and in which precision models run."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32", "bfloat16" or "float16": the autocast dtype, float32 meaning none
    reason: str

    @property
    def autocast(self) -> bool:
        return self.dtype != "float32"

    @property
    def torch_dtype(self) -> torch.dtype:  # noqa: F821
        import torch

        return getattr(torch, self.dtype)


def select_runtime(device: str = "auto", dtype: str = "auto", *, cuda_available: bool | None = None,
                   flags: frozenset[str] | None = None) -> Runtime:
    """Resolve `device` (auto|cpu|cuda) and `dtype` (auto|fp32|bf16|fp16) against what this machine can do.

    Measured on 1,000 WikiArt paintings (docs/BENCHMARKS.md, "The dtype rule"), ImageNet top-1 against fp32: fp16
    autocast agreed on 99.6%, bf16 autocast on 93.2% (bf16 keeps 8 bits of mantissa; paintings give many near-tied
    logits). So `auto` is fp16 on CUDA and fp32 on CPU; bf16 on a CPU is there for who wants its speed (1.6x with
    native AVX512-BF16 there) and only where the CPU computes bf16 natively (emulated, it was 8x slower than fp32 on an
    AVX2-only CPU). `classify train` trains with bf16 on a CUDA device that has it (`classify.train.training_runtime`).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"unknown dtype {dtype!r}; expected auto, fp32, bf16 or fp16")
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if device == "cuda" and not cuda_available:
        raise UsageError("--device cuda was asked for, but no CUDA device is available; use --device cpu or auto")
    resolved = "cuda" if device == "cuda" or (device == "auto" and cuda_available) else "cpu"
    if dtype == "fp32":
        return Runtime(resolved, "float32", "fp32 asked for")
    if resolved == "cuda":
        if dtype == "bf16":
            return Runtime(resolved, "bfloat16", "bf16 asked for")
        return Runtime(resolved, "float16", "CUDA: fp16 autocast (top-1 agrees with fp32 on 99.6%)")
    if dtype == "fp16":
        raise UsageError("--dtype fp16 is for CUDA; on a CPU it is emulated and slow: use fp32 (or auto)")
    if dtype == "bf16":
        if not cpu_has_native_bf16(flags):
            raise UsageError("--dtype bf16: this CPU has no native bf16 (emulated it ran 8x slower than fp32); "
                             "use fp32 (or auto)")
        return Runtime(resolved, "bfloat16", f"bf16 asked for, native on this CPU ({platform.machine()})")
    return Runtime(resolved, "float32", "CPU: fp32 (bf16 autocast changed 6.8% of top-1 predictions)")
