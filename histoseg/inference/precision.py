"""Which arithmetic the network runs in: bf16 only where the device computes it natively.

bfloat16 autocast halves CPU time on processors with native bf16 instructions (x86 AVX512-BF16 or AMX,
Arm's BF16 extension) and on CUDA GPUs that support it, at the same MoNuSeg-test accuracy. Elsewhere it is
emulated and ~100x *slower* than fp32 (measured: one 3x3 conv, 32 channels, 256², on an AVX2-only AMD EPYC:
3.05 s bf16 vs 0.027 s fp32). So ``--precision auto`` (the default) asks the hardware, never assumes.

The CPU query reads the processor's feature flags (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS), and
honours ``ONEDNN_MAX_CPU_ISA`` (oneDNN, PyTorch's CPU convolution library, capped below AVX512-BF16 emulates
bf16 even on a CPU that has it).
``HISTOSEG_CPU_BF16=0|1`` overrides it (a virtual machine that hides flags, or a test that simulates a CPU
without bf16); any other value is ignored.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import Literal

from histoseg.config import PRECISION_CHOICES
from histoseg.errors import ConfigError

CPU_BF16_ENV = "HISTOSEG_CPU_BF16"
X86_MACHINES = ("x86_64", "amd64", "i386", "i686", "x86")  # platform.machine() of x86 CPUs, lower case

_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ARM_BF16_FLAGS = ("bf16",)


@dataclass(frozen=True)
class PrecisionChoice:
    """The arithmetic used and why (recorded in provenance.json)."""

    precision: Literal["bf16", "fp32"]
    requested: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def to_dict(self) -> dict[str, str]:
        return {"precision": self.precision, "requested": self.requested, "reason": self.reason}


def _cpuinfo_flags() -> set[str]:
    """Feature flags of the first processor in ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def _macos_arm_bf16() -> bool:
    try:
        out = subprocess.run(
            ["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == "1"


_X86_INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_int8_saturates() -> tuple[bool, str]:
    """Whether int8 convolutions on this CPU may saturate (x86 without VNNI), and the evidence.

    Without VNNI, x86 int8 kernels multiply u8 activations by s8 weights in pairs into 16-bit sums
    (``vpmaddubsw``), which saturate for large weights; ONNX Runtime's advice is 7-bit weights
    (``reduce_range``) on such CPUs. Measured on an AVX2-only AMD EPYC with 8-bit weights: NP probability up
    to 0.86 away from fp32 on a CMU-1 crop. Arm's and VNNI's int8 dot products accumulate in 32 bits."""
    machine = platform.machine().lower()
    if machine not in X86_MACHINES:
        return False, f"{machine or 'this'} CPU: int8 dot products accumulate in 32 bits"
    flags = _cpuinfo_flags()
    found = [f for f in _X86_INT8_DOT_FLAGS if f in flags]
    if found:
        return False, f"CPU flag {', '.join(found)}"
    return True, f"x86 without {' or '.join(_X86_INT8_DOT_FLAGS)} (or its flags are not readable)"


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and the evidence (a short phrase)."""
    env = os.environ.get(CPU_BF16_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1", f"{CPU_BF16_ENV}={env}"
    machine = platform.machine().lower()
    if platform.system() == "Darwin":
        ok = machine in ("arm64", "aarch64") and _macos_arm_bf16()
        return ok, "macOS FEAT_BF16" if ok else "no FEAT_BF16 on this Mac"
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if isa and isa != "ALL" and "BF16" not in isa and "AMX" not in isa and "AVX10" not in isa:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} limits oneDNN below native bf16"
    flags = _cpuinfo_flags()
    wanted = _ARM_BF16_FLAGS if machine in ("aarch64", "arm64") else _X86_BF16_FLAGS
    found = [f for f in wanted if f in flags]
    if found:
        return True, f"CPU flag {', '.join(found)}"
    return False, f"no native bf16 CPU flag ({' or '.join(wanted)})"


def _cuda_bf16(device: str) -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "CUDA not available"
    index = torch.device(device).index
    with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
        ok = bool(torch.cuda.is_bf16_supported())
    return ok, "CUDA device supports bf16" if ok else "CUDA device lacks bf16"


def resolve_precision(requested: str, device: str = "cpu") -> PrecisionChoice:
    """Turn ``--precision`` into the arithmetic used on ``device``.

    ``auto``: bf16 where the device computes it natively, fp32 elsewhere. ``bf16``/``fp32``: as asked (bf16
    on a CPU without native support is allowed, with the reason saying it is emulated and slow).
    """
    if requested not in PRECISION_CHOICES:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    native, why = _cuda_bf16(device) if device.startswith("cuda") else cpu_native_bf16()
    if requested == "fp32":
        return PrecisionChoice("fp32", requested, "requested")
    if requested == "bf16":
        return PrecisionChoice("bf16", requested, "requested" + ("" if native else f"; emulated, slow: {why}"))
    return PrecisionChoice("bf16" if native else "fp32", requested, why)
