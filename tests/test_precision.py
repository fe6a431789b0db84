"""``--precision auto``: bf16 only where the device computes it natively, fp32 elsewhere, recorded in provenance."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from histoseg.cli.main import build_parser
from histoseg.config import SegmentConfig
from histoseg.errors import ConfigError
from histoseg.inference import precision as prec
from histoseg.inference.precision import CPU_BF16_ENV, cpu_native_bf16, resolve_precision
from histoseg.training.config import TrainConfig


@pytest.fixture
def fresh_query(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The CPU query recomputed for each case (it is cached per process)."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    cpu_native_bf16.cache_clear()
    yield monkeypatch
    cpu_native_bf16.cache_clear()


def _as_linux_cpu(mp: pytest.MonkeyPatch, machine: str, flags: set[str]) -> None:
    mp.setattr(prec.platform, "system", lambda: "Linux")
    mp.setattr(prec.platform, "machine", lambda: machine)
    mp.setattr(prec, "_cpuinfo_flags", lambda: flags)


AVX2_EPYC = {"sse2", "avx", "avx2", "fma", "f16c"}  # the AMD EPYC of issue 9: no AVX-512 at all
AVX512_NO_BF16 = AVX2_EPYC | {"avx512f", "avx512bw", "avx512vl"}  # emulated bf16: still slow


@pytest.mark.parametrize("flags", [AVX2_EPYC, AVX512_NO_BF16, set()])
def test_auto_is_fp32_without_native_bf16(fresh_query: pytest.MonkeyPatch, flags: set[str]) -> None:
    _as_linux_cpu(fresh_query, "x86_64", flags)
    choice = resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and not choice.bf16
    assert "avx512_bf16" in choice.reason  # says what it looked for


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_on_x86_with_native_bf16(fresh_query: pytest.MonkeyPatch, flag: str) -> None:
    _as_linux_cpu(fresh_query, "x86_64", AVX512_NO_BF16 | {flag})
    choice = resolve_precision("auto", "cpu")
    assert choice.bf16 and flag in choice.reason


def test_arm_uses_its_own_flag(fresh_query: pytest.MonkeyPatch) -> None:
    _as_linux_cpu(fresh_query, "aarch64", {"fp", "asimd", "bf16"})
    assert resolve_precision("auto").bf16
    cpu_native_bf16.cache_clear()
    _as_linux_cpu(fresh_query, "aarch64", {"fp", "asimd"})
    assert not resolve_precision("auto").bf16
    cpu_native_bf16.cache_clear()
    _as_linux_cpu(fresh_query, "aarch64", {"avx512_bf16"})  # an x86 flag means nothing on Arm
    assert not resolve_precision("auto").bf16


def test_environment_overrides_the_query(fresh_query: pytest.MonkeyPatch) -> None:
    _as_linux_cpu(fresh_query, "x86_64", AVX2_EPYC | {"avx512_bf16"})
    fresh_query.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision("auto").precision == "fp32"
    assert CPU_BF16_ENV in resolve_precision("auto").reason
    cpu_native_bf16.cache_clear()
    fresh_query.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("auto").precision == "bf16"


def test_onednn_isa_cap_means_emulated(fresh_query: pytest.MonkeyPatch) -> None:
    """``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX512-BF16 CPU makes bf16 ~150x slower (benchmarks/precision.py)."""
    _as_linux_cpu(fresh_query, "x86_64", AVX512_NO_BF16 | {"avx512_bf16"})
    fresh_query.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_precision("auto").precision == "fp32"
    cpu_native_bf16.cache_clear()
    fresh_query.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert resolve_precision("auto").precision == "bf16"


def test_explicit_choices_are_kept_and_emulation_is_named(fresh_query: pytest.MonkeyPatch) -> None:
    _as_linux_cpu(fresh_query, "x86_64", AVX2_EPYC)
    assert resolve_precision("fp32").precision == "fp32"
    forced = resolve_precision("bf16")
    assert forced.bf16 and "emulated" in forced.reason
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp16")


def test_real_cpuinfo_is_read() -> None:
    if platform.system() != "Linux":
        pytest.skip("reads /proc/cpuinfo")
    flags = prec._cpuinfo_flags()
    assert flags, "no flags parsed from /proc/cpuinfo"
    if platform.machine() == "x86_64":
        assert "sse2" in flags


def test_cuda_without_gpu_is_fp32(fresh_query: pytest.MonkeyPatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_precision("auto", "cuda").precision == "fp32"


def test_defaults_are_auto_everywhere() -> None:
    assert SegmentConfig().precision == "auto"
    assert TrainConfig().precision == "auto"
    args = build_parser().parse_args(["segment", "x.svs", "-o", "out"])
    assert args.precision == "auto"
    ev = build_parser().parse_args(["evaluate", "--dataset", "dsb"])
    assert ev.precision == "auto"
    with pytest.raises(ConfigError):
        TrainConfig.from_dict({"precision": "half"})


def test_the_suite_itself_runs_without_bf16() -> None:
    """conftest makes every test (and CLI subprocess) resolve ``auto`` as a CPU without native bf16 does,
    so no test's time depends on bf16 being fast; an explicit HISTOSEG_CPU_BF16=1 opts in."""
    import os

    if os.environ.get(CPU_BF16_ENV) == "1":
        pytest.skip("suite deliberately run with native bf16")
    assert resolve_precision("auto").precision == "fp32"


def test_provenance_records_precision(tmp_path: Path, shared_data: Path) -> None:
    """The shipped model on a real slide crop: provenance says which arithmetic ran and why."""
    import cv2

    from histoseg.cli.main import main
    from histoseg.io import open_slide
    from histoseg.types import Box

    src = shared_data / "slides" / "aperio-cmu1-small" / "CMU-1-Small-Region.svs"
    with open_slide(src) as reader:
        crop = reader.read_plane(Box(600, 900, 384, 384), float(reader.meta.mpp or 0.5))
    png = tmp_path / "crop.png"
    cv2.imwrite(str(png), crop[..., ::-1])
    rc = main(["segment", str(png), "-o", str(tmp_path / "out"), "--slide-mpp", "0.499", "--tta", "none",
               "--no-report"])
    assert rc == 0
    record = json.loads((tmp_path / "out" / "crop" / "provenance.json").read_text())
    assert record["precision"]["precision"] == "fp32"
    assert record["precision"]["requested"] == "auto"
    assert CPU_BF16_ENV in record["precision"]["reason"]
