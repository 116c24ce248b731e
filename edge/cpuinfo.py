"""What CPU a figure ran on: model name and the ISA flags that change inference kernels (Linux /proc/cpuinfo)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

# The flags that decide which oneDNN / MLAS kernels run, hence speed and (for OpenVINO on AMX) rounding.
RELEVANT = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _fields() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in (platform.processor(), platform.machine()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return name, flags


def model_name() -> str:
    return _fields()[0]


def isa_flags() -> list[str]:
    flags = _fields()[1]
    return [f for f in RELEVANT if f in flags]


def describe() -> str:
    """E.g. "Intel(R) Xeon(R) Processor (avx2 avx512_vnni amx_int8), ONEDNN_MAX_CPU_ISA=AVX2"."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{model_name()} ({' '.join(isa_flags()) or 'no AVX2'})" + (f", ONEDNN_MAX_CPU_ISA={cap}" if cap else "")
