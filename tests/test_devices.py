"""``--device``: one check for every command (``histoseg.config.check_device``). A GPU this machine lacks is one
clear line before any slide is read or any step trained, not torch's "Torch not compiled with CUDA enabled"
inside every slide's task; where the workers run elsewhere (a job queue, a scheduler) the client's own lack of a
GPU is no error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histoseg.cli.main import main
from histoseg.config import check_device
from histoseg.distributed import ClusterSpec
from histoseg.errors import ConfigError
from histoseg.training.config import TrainConfig

from .conftest import make_demo_slide

REPO = Path(__file__).resolve().parent.parent
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


def _err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("histoseg: error:")]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(device: str) -> None:
    check_device(device)  # the name alone: no GPU needed


@pytest.mark.parametrize("device", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda0", "cpu:0", "mps", ""])
def test_device_names_refused(device: str) -> None:
    with pytest.raises(ConfigError, match="must be cpu, cuda or cuda:N"):
        check_device(device)


def test_cpu_is_always_here() -> None:
    check_device("cpu", here=True)


def test_device_index_beyond_the_machine() -> None:
    beyond = f"cuda:{torch.cuda.device_count()}"  # one past the last device this machine has
    with pytest.raises(ConfigError, match="no such CUDA device on this machine"):
        check_device(beyond, here=True)


@no_cuda
def test_cuda_missing_here() -> None:
    with pytest.raises(ConfigError, match="no such CUDA device on this machine"):
        check_device("cuda", option="device", here=True)


@no_cuda
def test_workers_elsewhere_may_have_the_gpu() -> None:
    """A job queue's or a scheduler's workers run on other machines: the client needs no GPU for them."""
    ClusterSpec(kind="slurm").check_device("cuda")
    ClusterSpec(scheduler="tcp://127.0.0.1:8786").check_device("cuda")
    ClusterSpec(workers=2).check_device("cuda", runs_here=False)  # a caller's own runner
    with pytest.raises(ConfigError, match="no such CUDA device"):
        ClusterSpec(workers=2).check_device("cuda")  # local workers: this machine's devices


@no_cuda
def test_segment_without_the_gpu_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = make_demo_slide(tmp_path / "demo.tif", 256, 3)
    out = tmp_path / "out"
    assert main(["segment", str(slide), "-o", str(out), "--device", "cuda", "--no-report"]) == 1
    errs = _err_lines(capsys)
    assert len(errs) == 1 and "--device cuda: no such CUDA device" in errs[0], errs
    assert not (out / "demo").exists()  # refused before the slide's folder was made
    assert main(["segment", str(slide), "-o", str(out), "--device", "gpu", "--no-report"]) == 1
    assert "must be cpu, cuda or cuda:N" in _err_lines(capsys)[0]


def test_training_config_device_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="device must be cpu, cuda or cuda:N"):
        TrainConfig.from_dict({"device": "gpu", "output": str(tmp_path / "run")})


@no_cuda
def test_train_device_override(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``histoseg train --device`` runs a shipped recipe elsewhere without editing it; a GPU this machine lacks is
    refused before the datasets are read (nothing is written)."""
    cfg = REPO / "configs" / "default.yaml"
    assert main(["train", "--config", str(cfg), "--device", "cuda"]) == 1
    errs = _err_lines(capsys)
    assert len(errs) == 1 and "--device cuda: no such CUDA device" in errs[0], errs
    assert main(["train", "--config", str(cfg), "--device", "tpu"]) == 1
    assert "--device must be cpu, cuda or cuda:N" in _err_lines(capsys)[0]
    run = tmp_path / "run.yaml"  # the recipe's own device, when the flag is absent
    run.write_text(f"output: {tmp_path / 'out'}\ndevice: cuda\n")
    assert main(["train", "--config", str(run)]) == 1
    assert "device cuda: no such CUDA device" in _err_lines(capsys)[0]
    assert not (tmp_path / "out").exists()


def test_typing_benchmark_checks_the_ablation_device_before_scoring(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m benchmarks.typing --device`` trains the ablation there: a device this machine lacks is refused at
    once, not after the minutes of the typed rows (nothing is printed before the error)."""
    from benchmarks.typing import main as typing_main

    n = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"cuda:{n}"):
        typing_main(["--device", f"cuda:{n}", "--ablation-iterations", "1"])
    assert capsys.readouterr().out == ""
