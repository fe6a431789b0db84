""""One error line" holds where libraries make noise: a slide with corrupt JPEG tiles (zarr's abandoned async
reads used to print ~150 lines of tracebacks at exit) and a full disk while the adapted weights are saved."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

CLI = [sys.executable, "-c", "import sys; from histoseg.cli.main import main; sys.exit(main())"]


def _corrupt_copy(src: Path, dst: Path) -> Path:
    """A copy of a real SVS with three of its JPEG tiles overwritten by garbage (headers and data)."""
    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as t:
        offsets = t.pages[0].dataoffsets
    rng = np.random.default_rng(0)
    with open(dst, "r+b") as f:
        for k in (5, 17, 30):
            f.seek(offsets[k] + 600)
            f.write(rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
            f.seek(offsets[k] + 2)
            f.write(b"\xff\xd9garbage")
    return dst


def test_corrupt_tiles_give_one_error_line(shared_data: Path, tmp_path: Path) -> None:
    bad = _corrupt_copy(shared_data / "slides" / "aperio-cmu1-small" / "CMU-1-Small-Region.svs", tmp_path / "bad.svs")
    proc = subprocess.run(
        [*CLI, "segment", str(bad), "-o", str(tmp_path / "out"), "--tta", "none", "--no-report"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("histoseg: error:")]
    assert len(errors) == 1 and "bad.svs" in errors[0], proc.stderr
    noise = [line for line in proc.stderr.splitlines() if " INFO " not in line and line not in errors]
    assert noise == [], proc.stderr[-3000:]


def test_disk_full_while_saving_adapted_weights_is_one_line(shared_data: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 64 KB fail (EFBIG), as a full disk does, in a child process."""
    from .conftest import dsb_image_that_adapts

    slide = dsb_image_that_adapts(shared_data)
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))\n"
        "from histoseg.cli.main import main\n"
        f"sys.exit(main(['adapt', {str(slide)!r}, '--slide-mpp', '0.5', '--output', "
        f"{str(tmp_path / 'w.safetensors')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("histoseg: error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w.safetensors").exists()  # nothing half-written left under the final name


def test_unreadable_weights_are_one_error_for_the_batch(tmp_path: Path) -> None:
    """Truncated weights beside a valid card: one line, exit 1, and no slide folder made (not one failure per
    slide with empty folders, as before)."""
    import cv2

    from histoseg.models import resolve_model

    art = resolve_model("default")
    shutil.copy(art.card_path, tmp_path / "bad.json")
    (tmp_path / "bad.safetensors").write_bytes(art.weights.read_bytes()[:100_000])
    img = np.full((256, 256, 3), (230, 170, 200), np.uint8)
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), img)
    proc = subprocess.run(
        [*CLI, "segment", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(tmp_path / "out"),
         "--slide-mpp", "0.5", "--model", str(tmp_path / "bad.safetensors"), "--tta", "none"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("histoseg: error: cannot read weights"), proc.stderr
    assert not (tmp_path / "out").exists()
