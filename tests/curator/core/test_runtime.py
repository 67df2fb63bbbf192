from __future__ import annotations

import sys

import pytest

from curator.core.errors import UsageError
from curator.core.runtime import configure_allocator, cpu_has_native_bf16, select_runtime

AVX2 = frozenset({"avx2", "fma"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})


def test_bf16_only_with_native_hardware_and_only_when_asked():
    assert not cpu_has_native_bf16(AVX2)
    assert cpu_has_native_bf16(ZEN4)
    assert cpu_has_native_bf16(frozenset({"amx_bf16"}))
    assert select_runtime("cpu", "auto", cuda_available=False, flags=AVX2).dtype == "float32"
    # bf16 changed 6.8% of top-1 predictions on paintings: never chosen automatically
    assert select_runtime("cpu", "auto", cuda_available=False, flags=ZEN4).dtype == "float32"
    assert select_runtime("cpu", "bf16", cuda_available=False, flags=ZEN4).dtype == "bfloat16"
    with pytest.raises(UsageError, match="no native bf16"):
        select_runtime("cpu", "bf16", cuda_available=False, flags=AVX2)
    with pytest.raises(UsageError, match="fp16 is for CUDA"):
        select_runtime("cpu", "fp16", cuda_available=False, flags=ZEN4)


def test_device_selection():
    assert select_runtime("auto", cuda_available=True, flags=AVX2).device == "cuda"
    assert select_runtime("auto", cuda_available=True, flags=AVX2).dtype == "float16"
    assert select_runtime("cuda", "bf16", cuda_available=True, flags=AVX2).dtype == "bfloat16"
    assert select_runtime("auto", cuda_available=False, flags=AVX2).device == "cpu"
    assert select_runtime("cpu", cuda_available=True, flags=AVX2).device == "cpu"
    with pytest.raises(UsageError, match="no CUDA device"):
        select_runtime("cuda", cuda_available=False)
    with pytest.raises(UsageError, match="unknown device"):
        select_runtime("tpu")
    with pytest.raises(UsageError, match="unknown dtype"):
        select_runtime("cpu", "fp8")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_is_configured_on_glibc():
    assert configure_allocator() == "glibc: mmap off, trim threshold 2 GiB"
    assert configure_allocator() == "glibc: mmap off, trim threshold 2 GiB"  # idempotent
