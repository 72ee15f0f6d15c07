"""Which exact low-precision GEMMs this CPU runs fast, read from the flags the kernel reports.

torch's int8 GEMM (``torch._int_mm``) and bfloat16 GEMM are exact for small integer operands and
fast where the CPU has the instructions for them (AMX, AVX-512 VNNI / BF16, AVX-VNNI). Without
them torch falls back to reference loops: on an AVX2-only AMD EPYC (Zen 3) with torch 2.13 an
int8 product ran at 5.9 Gop/s and a bfloat16 one at 19, against 160 for float32. Callers then use
float32, which holds every integer up to 2²⁴ exactly.

The same flags, with the CPU's name, are what models/compounds/chem.py logs when it picks its engine and
what the benchmarks print.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_INT8_FLAGS = frozenset({"amx_int8", "avx512_vnni", "avx_vnni"})
_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


#: The flags that decide the compound-similarity engine (models/compounds/chem.py), as /proc/cpuinfo spells
#: them: AMX tiles, the AVX-512 vector popcount, the bf16/int8 dot products; ``asimd`` is ARM NEON.
ENGINE_FLAGS = (
    "amx_bf16",
    "amx_int8",
    "avx512_vpopcntdq",
    "avx512_bf16",
    "avx512_vnni",
    "avx_vnni",
    "avx2",
    "popcnt",
    "asimd",
    "sve",
)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` (x86) or ``Features`` (ARM) of /proc/cpuinfo (empty where there is none:
    then no fast path is assumed)."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's name: /proc/cpuinfo's ``model name`` (x86), else its implementer and part (ARM),
    else what Python's platform module says."""
    fields: dict[str, str] = {}
    for line in _cpuinfo().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):
        # Virtual machines often hide the name ("Intel(R) Xeon(R) Processor"); family and model
        # still tell the generation.
        return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    if "CPU part" in fields:
        return f"ARM implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    return platform.processor() or platform.machine() or "unknown CPU"


def engine_flags() -> list[str]:
    """Which of :data:`ENGINE_FLAGS` this CPU has, in that order."""
    return [flag for flag in ENGINE_FLAGS if flag in cpu_flags()]


def has_amx() -> bool:
    """True where the CPU has AMX tiles for bfloat16 or int8 (Intel Sapphire Rapids and later)."""
    return bool(cpu_flags() & {"amx_bf16", "amx_int8"})


def fast_int8_gemm() -> bool:
    """True where the CPU multiplies int8 matrices in hardware (AMX, AVX-512 VNNI, AVX-VNNI)."""
    return bool(cpu_flags() & _INT8_FLAGS)


def fast_bf16_gemm() -> bool:
    """True where the CPU multiplies bfloat16 matrices in hardware (AMX, AVX-512 BF16)."""
    return bool(cpu_flags() & _BF16_FLAGS)
