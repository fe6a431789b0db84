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


def test_disk_full_while_saving_adapted_weights_is_one_line(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past 64 KB fail (EFBIG), as a full disk does, in a child process."""
    from .conftest import make_demo_slide

    slide = make_demo_slide(tmp_path / "demo.tif", 512, 1)
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))\n"
        "from histoseg.cli.main import main\n"
        f"sys.exit(main(['adapt', {str(slide)!r}, '--output', {str(tmp_path / 'w.safetensors')!r},"
        " '--tta', 'bn', '--tta-regions', '1']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("histoseg: error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w.safetensors").exists()  # nothing half-written left under the final name
