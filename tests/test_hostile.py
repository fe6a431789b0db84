"""Hostile and careless input (issue 10): every case is a typed error and one line, or correct output;
bounded memory; nothing outside the slide's own folder touched; the batch carries on."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoseg.atomic import atomic_file, is_temporary_name, remove_stale_temporaries
from histoseg.cli.main import main
from histoseg.config import SegmentConfig
from histoseg.distributed import InProcessRunner
from histoseg.errors import ConfigError, ImplausibleSlideError, ModelError, OutputError, UnsupportedImageError
from histoseg.io import open_slide
from histoseg.io.limits import covered_bytes
from histoseg.models import ModelCard, load_model, resolve_model
from histoseg.models.registry import WEIGHTS_DIR
from histoseg.pipeline import discover, output_name, segment_batch, segment_slide
from histoseg.pipeline.folder import LOCK_NAME, MAX_NAME_BYTES, FolderLock, adapted_paths, remove_intermediates

from .oracle import OraclePredictor
from .synthetic import random_nuclei, write_slide

# ------------------------------------------------------------------------------------------- helpers


def bomb_tiff(path: Path, width: int, height: int, tiled: bool = False, piece: int = 8192) -> Path:
    """A few-hundred-byte TIFF declaring ``width x height`` RGB px whose strips (or tiles) all point at
    one small zlib block."""
    block = zlib.compress(b"\xf0" * 3 * 256 * 16, 9)
    n = math.ceil(width / piece) * math.ceil(height / piece) if tiled else math.ceil(height / piece)
    data = bytearray(b"II*\x00\x00\x00\x00\x00")
    block_at, bps_at = len(data), len(data) + len(block)
    data += block + struct.pack("<3H", 8, 8, 8)
    offs_at = len(data)
    data += struct.pack(f"<{n}I", *([block_at] * n))
    cnts_at = len(data)
    data += struct.pack(f"<{n}I", *([len(block)] * n))
    if n == 1:
        offs_at, cnts_at = block_at, len(block)
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, bps_at), (259, 3, 1, 8), (262, 3, 1, 2)]
    entries += [(277, 3, 1, 3), (284, 3, 1, 1)]
    if tiled:
        entries += [(322, 4, 1, piece), (323, 4, 1, piece), (324, 4, n, offs_at), (325, 4, n, cnts_at)]
    else:
        entries += [(273, 4, n, offs_at), (278, 4, 1, piece), (279, 4, n, cnts_at)]
    data += b"\x00" * (len(data) % 2)
    data[4:8] = struct.pack("<I", len(data))
    data += struct.pack("<H", len(entries))
    for tag, typ, count, value in sorted(entries):
        fmt = "<HHIHH" if typ == 3 and count == 1 else "<HHII"
        data += struct.pack(fmt, tag, typ, count, value, *([0] if fmt == "<HHIHH" else []))
    data += struct.pack("<I", 0)
    path.write_bytes(bytes(data))
    return path


def _limited_cli(args: list[str], cwd: Path, mem_gb: float = 3.0, cpu_s: int = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a child whose address space and CPU time are capped (a bound, not a timing)."""
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({int(mem_gb * 2**30)}, {int(mem_gb * 2**30)}))\n"
        f"resource.setrlimit(resource.RLIMIT_CPU, ({cpu_s}, {cpu_s}))\n"
        "from histoseg.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, env=env)


@pytest.fixture()
def slide(tmp_path: Path) -> tuple[Path, OraclePredictor]:
    labels = random_nuclei((300, 380), 120, seed=1)
    path = write_slide(tmp_path / "good.tif", labels, 0.5)
    labels[:, int(380 * 0.85) :] = 0
    return path, OraclePredictor(labels, 0.5)


def _run(paths: list[Path], out: Path, oracle: OraclePredictor, **cfg: object) -> list:  # type: ignore[type-arg]
    config = SegmentConfig(**cfg)  # type: ignore[arg-type]
    return segment_batch([str(p) for p in paths], out, config, runner=InProcessRunner(), predictor=oracle)


# ----------------------------------------------------------------------------- 1. names and cleanup


@pytest.mark.parametrize("name", ["...png", "..png", ".png", ".ome.tif", "....ome.tiff", " .. .tif"])
def test_dot_names_never_reach_outside_their_folder(
    tmp_path: Path, slide: tuple[Path, OraclePredictor], name: str
) -> None:
    good, oracle = slide
    parent = tmp_path / "parent"
    out = parent / "out"
    (parent / ".keep_dir").mkdir(parents=True)
    (parent / ".keep_dir" / "key").write_text("secret")
    (parent / ".important_file").write_text("x")
    out.mkdir()
    (out / ".config").write_text("y")
    src = tmp_path / "slides"
    src.mkdir()
    shutil.copy(good, src / name)
    [rep] = _run([src / name], out, oracle)
    assert rep.status == "ok", rep.message
    folder = Path(rep.output)
    assert folder.parent == out and not folder.name.startswith(".") and (folder / "_SUCCESS").exists()
    assert (parent / ".keep_dir" / "key").read_text() == "secret" and (parent / ".important_file").exists()
    assert (out / ".config").read_text() == "y"
    assert sorted(p.name for p in parent.iterdir()) == [".important_file", ".keep_dir", "out"]


def test_output_names_fuzz() -> None:
    rng = random.Random(0)
    alphabet = ["."] * 6 + [" ", "\\", ":", "\n", "\x01", "\x7f", "a", "Z", "é", "核", "-", "_", "~"]
    names = ["", ".", "..", "...", "a" * 400, "é" * 300, "\\..\\x", "C:..", ".ome.zarr", "x.ome.zarr"]
    names += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) + rng.choice(["", ".png", ".tif"])
              for _ in range(500)]
    for raw in names:
        got = output_name(raw or "x")
        assert got not in ("", ".", "..") and not got.startswith(".") and not got.startswith(" "), (raw, got)
        assert not any(c in got for c in "/\\:\x00\n\x01\x7f"), (raw, got)
        assert len(got.encode()) <= MAX_NAME_BYTES and got == output_name(raw or "x")
    assert output_name("CMU-1.svs") == "CMU-1" and output_name("a.ome.tiff") == "a"
    assert output_name("a" * 400 + ".svs") != output_name("a" * 399 + "b.svs")


def test_cleanup_removes_only_atomic_temporaries(tmp_path: Path) -> None:
    folder = tmp_path / "slide"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("keep")
    keep = [".ssh", ".x.tmp-0123456789ag", "x.tmp-0123456789ab", ".x.tmp-0123456789a", ".histoseg.lock", "_regions"]
    for n in keep:
        (folder / n).mkdir() if n in (".ssh", "_regions") else (folder / n).write_text("k")
    gone = [".a.geojson.tmp-0123456789ab", ".a.zarr.old-abcdefabcdef"]
    (folder / gone[0]).write_text("partial")
    (folder / gone[1]).mkdir()
    (folder / gone[1] / "chunk").write_text("c")
    (folder / ".b.zarr.tmp-aaaaaaaaaaaa").symlink_to(outside, target_is_directory=True)
    assert remove_stale_temporaries(folder) == sorted([*gone, ".b.zarr.tmp-aaaaaaaaaaaa"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)
    assert (outside / "f").read_text() == "keep"
    with atomic_file(folder / "t.json") as tmp:  # the writers' names are exactly the pattern
        assert is_temporary_name(tmp.name)


# ------------------------------------------------------------------------------ 2. decompression bombs


def test_covered_bytes_counts_overlaps_once() -> None:
    assert covered_bytes([0, 0, 0], [10, 10, 10], 100) == 10
    assert covered_bytes([0, 5, 20], [10, 10, 5], 100) == 20
    assert covered_bytes([90], [50], 100) == 10 and covered_bytes([], [], 100) == 0


@pytest.mark.parametrize("w,h,tiled", [(10**6, 10**6, False), (10**5, 10**5, True), (16000, 16000, False)])
def test_bombs_are_refused_at_open(tmp_path: Path, w: int, h: int, tiled: bool) -> None:
    p = bomb_tiff(tmp_path / "bomb.tif", w, h, tiled)
    assert p.stat().st_size < 4096
    with pytest.raises(ImplausibleSlideError, match="decompression bomb"):
        open_slide(p, mpp=0.5)
    for backend in ("tiffslide", "image"):
        with pytest.raises(ImplausibleSlideError):
            open_slide(p, backend=backend, mpp=0.5)


def test_bomb_cli_one_line_bounded_memory(tmp_path: Path) -> None:
    bomb = bomb_tiff(tmp_path / "bomb.tif", 10**6, 10**6)
    for args in (["info", str(bomb)], ["segment", str(bomb), "-o", "out", "--slide-mpp", "0.5", "--tta", "none"]):
        res = _limited_cli(args, tmp_path)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 1 and "decompression bomb" in res.stderr, res.stderr[-2000:]
        assert sum("error" in ln.lower() or "failed" in ln for ln in lines) <= 2, res.stderr  # segment: line + summary
        assert "Traceback" not in res.stderr


def test_png_named_tif_is_decoded_by_content(tmp_path: Path) -> None:
    p = tmp_path / "really_a.png.tif"
    Image.fromarray(np.full((64, 80, 3), (200, 120, 180), np.uint8)).save(p, format="PNG")
    with open_slide(p, mpp=0.5) as r:
        assert r.meta.dimensions == (80, 64) and r.meta.backend == "image"


# ----------------------------------------------------------------------------------- 3. folder lock


def test_second_run_into_a_locked_folder_refuses(tmp_path: Path, slide: tuple[Path, OraclePredictor]) -> None:
    good, oracle = slide
    out = tmp_path / "out"
    (out / "good").mkdir(parents=True)
    with FolderLock(out / "good"):
        with pytest.raises(OutputError, match="another histoseg run"), FolderLock(out / "good"):
            pass
        [rep] = _run([good], out, oracle)
        assert rep.status == "failed" and "another histoseg run" in rep.message
        assert not (out / "good" / "_SUCCESS").exists()
    [rep] = _run([good], out, oracle)  # released: the next run proceeds
    assert rep.status == "ok"


def test_lock_is_released_when_its_process_is_killed(tmp_path: Path) -> None:
    folder = tmp_path / "slide"
    folder.mkdir()
    code = (
        "import sys, time\nfrom histoseg.pipeline.folder import FolderLock\n"
        f"with FolderLock({str(folder)!r}):\n    print('locked', flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=r"pid \d+"), FolderLock(folder):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with FolderLock(folder):  # a lock file left by a killed run is not a lock
        assert (folder / LOCK_NAME).exists()
    assert not (folder / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- 4. what _SUCCESS says


def test_success_names_its_slide_and_settings(tmp_path: Path, slide: tuple[Path, OraclePredictor]) -> None:
    good, oracle = slide
    out = tmp_path / "out"
    [first] = _run([good], out, oracle)
    assert first.status == "ok" and first.nuclei > 20
    record = json.loads((out / "good" / "_SUCCESS").read_text())
    assert record["slide"]["path"] == str(good.resolve()) and record["nuclei"] == first.nuclei
    assert len(record["settings_sha256"]) == 64 and "completed" in record
    [again] = _run([good], out, oracle)
    assert again.status == "skipped" and again.nuclei == first.nuclei  # the real count, not 0

    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    other = write_slide(other_dir / "good.tif", random_nuclei((300, 380), 60, seed=7), 0.5)
    [rep] = _run([other], out, oracle)  # a different slide with the same stem
    assert rep.status == "failed" and "another slide" in rep.message
    [rep] = _run([good], out, oracle, min_nucleus_area_um2=5.0)  # same slide, other settings: kept, said so
    assert rep.status == "skipped" and "other settings" in rep.message and rep.nuclei == first.nuclei
    assert json.loads((out / "good" / "_SUCCESS").read_text())["nuclei"] == first.nuclei  # untouched

    shutil.copy(other, good)  # the slide changed in place: segmented again
    [rep] = _run([good], out, oracle)
    assert rep.status == "ok", rep.message
    assert json.loads((out / "good" / "_SUCCESS").read_text())["slide"]["fingerprint"]["hex"] != (
        record["slide"]["fingerprint"]["hex"]
    )


def test_adapted_weights_are_removed_after_success_unless_kept(tmp_path: Path) -> None:
    for keep in (False, True):
        folder = tmp_path / str(keep)
        folder.mkdir()
        weights, card = adapted_paths(folder, "s")
        weights.write_bytes(b"w")
        card.write_text("{}")
        (folder / "s.geojson").write_text("{}")
        remove_intermediates(folder, "s", SegmentConfig(keep_adapted=keep))
        assert weights.exists() == card.exists() == keep and (folder / "s.geojson").exists()


def test_missing_input_does_not_reserve_the_name(tmp_path: Path, slide: tuple[Path, OraclePredictor]) -> None:
    good, oracle = slide
    reps = _run([tmp_path / "missing" / "good.tif", good], tmp_path / "out", oracle)
    assert [r.status for r in reps] == ["failed", "ok"]


def test_output_inside_input_folder_is_not_rediscovered(tmp_path: Path, slide: tuple[Path, OraclePredictor]) -> None:
    good, oracle = slide
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(good, folder / "a.tif")
    assert [r.status for r in _run([folder], folder / "out", oracle)] == ["ok"]
    assert (folder / "out" / "a" / "a.zarr").is_dir()
    assert discover([str(folder)]) == [folder / "a.tif"]
    assert discover([str(folder / "**" / "*.zarr")]) == []
    assert [r.status for r in _run([folder], folder / "out", oracle)] == ["skipped"]


# ----------------------------------------------------------------------------- 5. adapt --output


def test_adapt_never_overwrites_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = resolve_model("default")
    model = tmp_path / "m.safetensors"
    shutil.copy(src.weights, model)
    shutil.copy(src.card_path, model.with_suffix(".json"))
    before, slide = model.read_bytes(), tmp_path / "s.png"
    Image.fromarray(np.full((64, 64, 3), (200, 120, 180), np.uint8)).save(slide)
    cases = [
        (["--model", str(model), "--output", str(model)], "model being adapted"),
        (["--output", str(WEIGHTS_DIR / "x.safetensors")], "shipped models"),
        (["--output", "/proc/x.safetensors"], "cannot write"),
    ]
    for extra, text in cases:
        assert main(["adapt", str(slide), "--slide-mpp", "0.5", "--tta", "g2p", *extra]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and text in err[0], err
    assert model.read_bytes() == before
    assert main(["evaluate", "--dataset", "monuseg-test", "--json", "/proc/x.json", "--limit", "1"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "cannot write" in err[0], err


# ------------------------------------------------------------------------- 6. cards and option bounds


def _card_dict() -> dict:  # type: ignore[type-arg]
    return json.loads(resolve_model("default").card_path.read_text())


BAD_CARD_FIELDS = [
    ("mpp", 1e-3), ("mpp", "0.5"), ("mpp", float("nan")), ("architecture.width", 100_000),
    ("architecture.blocks", [10**6, 1, 1, 1]), ("architecture.blocks", [1, 1]), ("context_radius_px", 10**12),
    ("input.std", [0, 0, 0]), ("input.mean", [0.5, 0.5]), ("classes", []),
    ("classes", [{"id": 1, "name": "N", "color": [1000, -5, 3]}]),
    ("classes", [{"id": 1, "name": "", "color": [1, 2, 3]}]),
    ("postprocess", {"no_such_key": 1}), ("postprocess", {"np_threshold": "high"}), ("max_nucleus_um", -1),
    ("name", None), ("architecture", [1]), ("format", 99),
]  # fmt: skip


def _set(d: dict, dotted: str, value: object) -> None:  # type: ignore[type-arg]
    *head, last = dotted.split(".")
    for k in head:
        d = d[k]
    d[last] = value


@pytest.mark.parametrize("key,value", BAD_CARD_FIELDS)
def test_bad_card_fields_are_model_errors(key: str, value: object) -> None:
    d = _card_dict()
    _set(d, key, value)
    with pytest.raises(ModelError, match="malformed model card"):
        ModelCard.from_dict(d)


def test_card_fuzz_never_raises_anything_but_model_error() -> None:
    rng = random.Random(1)
    values = [None, -1, 0, 1, 0.5, 1e9, -1e-9, float("inf"), "x", "", [], [1, 2, 3], {}, {"a": 1}, True, 10**20]
    keys = ["mpp", "architecture.width", "architecture.n_types", "context_radius_px", "max_nucleus_um",
            "input.mean", "input.std", "classes", "postprocess", "name", "format", "architecture.blocks"]
    ok = 0
    for _ in range(400):
        d = _card_dict()
        for key in rng.sample(keys, rng.randint(1, 3)):
            _set(d, key, rng.choice(values))
        try:
            card = ModelCard.from_dict(d)
        except ModelError:
            continue
        ok += 1
        assert 0 < card.halo_px() <= 4096 and card.class_names and min(card.std) > 0
    assert ok > 0  # some mutations are valid (e.g. mpp 1)


def test_wrong_shape_weights_are_one_line(tmp_path: Path) -> None:
    src = resolve_model("default")
    d = _card_dict()
    d["architecture"]["width"] = 16
    model = tmp_path / "w.safetensors"
    shutil.copy(src.weights, model)
    model.with_suffix(".json").write_text(json.dumps(d))
    with pytest.raises(ModelError) as info:
        load_model(resolve_model(str(model)))
    assert "\n" not in str(info.value) and "more tensors" in str(info.value)


def test_option_bounds() -> None:
    with pytest.raises(ConfigError, match="8192"):
        SegmentConfig(region_size=100_000)
    for bad in ({"min_tissue_fraction": 2.0}, {"np_threshold": float("nan")}, {"tta_steps": 10**6}):
        with pytest.raises(ConfigError):
            SegmentConfig(**bad)  # type: ignore[arg-type]


def test_evaluate_limit_is_a_count_of_images(capsys: pytest.CaptureFixture[str]) -> None:
    """``--limit 0`` and ``--limit -2`` had scored every image and all but the last two (Python slicing)."""
    from histoseg.training.evaluate import first

    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", "--dataset", "dsb", "--limit", bad])
        assert exc.value.code == 2 and "--limit" in capsys.readouterr().err
    assert first([1, 2, 3], 2) == [1, 2] and first([1, 2, 3], None) == first([1, 2, 3], 0) == [1, 2, 3]
    with pytest.raises(ConfigError, match="limit must be >= 0"):
        first([1, 2, 3], -2)


def test_absurd_upsampling_is_refused(tmp_path: Path, slide: tuple[Path, OraclePredictor]) -> None:
    _, oracle = slide
    img = tmp_path / "img.png"
    Image.fromarray(np.full((1024, 1024, 3), (200, 120, 180), np.uint8)).save(img)
    with pytest.raises(UnsupportedImageError, match="coarser"):
        segment_slide(img, tmp_path / "out", SegmentConfig(slide_mpp=100), InProcessRunner(), oracle)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
