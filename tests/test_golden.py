"""Golden outputs: the embedded demo slide and CMU-1-Small-Region give exactly the recorded outputs.

Why: refactors of the instance table, stitching and the region store must not change a single output
value. The digests below were recorded with this version's code (fp32 PyTorch, the reference engine, on CPU,
no TTA, one worker; the default OpenVINO engine is held to PyTorch's maps in test_runtime.py); a
change of a GeoJSON byte, a Parquet value (schema metadata included) or a Zarr array/attribute fails here.
Parquet and Zarr are hashed by content (decoded values, parsed attributes), not by file bytes, so a new
compressor or writer library version does not count as a change.

One exception: the per-nucleus probability is a mean of fp32 network outputs whose last bits depend on the
CPU's kernels and thread count (measured: ~5e-7 between 1 and 2 threads), so it is masked out of the hashes
and checked instead by an order-sensitive weighted sum with a relative tolerance. Labels, polygons and
measurements did not change with the thread count. A deliberate output change updates the constants (run
this file on each recorded kind of CPU, copy the ``got`` values; drop a kind that cannot be rerun) and says why
in its commit message.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from histoseg.cli.main import main
from histoseg.export import feature_uuid
from histoseg.pipeline.identity import slide_fingerprint

from .conftest import make_demo_slide

FLAGS = ["--tta", "none", "--precision", "fp32", "--runtime", "torch", "--workers", "1", "--no-report"]
PROBABILITY = re.compile(rb'("Detection probability":)([^,}]+)')
FEATURE_ID = re.compile(rb'(\{"type":"Feature","id":")([0-9a-f-]{36})(")')
REL_TOL = 1e-5  # on the weighted probability sum: far above fp32 kernel noise, far below any real change

# Digests per kind of CPU (torch.backends.cpu.get_cpu_capability() of the machine they were recorded on): fp32
# convolution kernels round differently per instruction set (AVX2, AVX-512, Arm), and a threshold crossed by
# 1e-7 moves a pixel, so each kind has its own. Recorded: AVX512 on an Intel Xeon (AVX-512 and AMX); AVX2 on an
# AMD EPYC (AVX2 only; identical with 1 and 2 torch threads). On these two slides every digest agreed between the
# two kinds but the demo's GeoJSON, whose feature ids hash the slide file that the test writes (JPEG tiles): the
# file came out as other bytes on the two machines, the same pixels reached the network (the Parquet and Zarr
# digests agree). So the GeoJSON hash now masks the ids and checks each one against the slide's key instead.
# A kind's entry may lack a digest nobody recorded there; the others are still checked.
# Re-recorded on 2026-12-04 when the default model gained its type head (issue 14): the nuclei's outlines and
# measurements are the untyped network's to the bit (its NP/HV maps are unchanged), but every class and probability
# changed. Only the AVX2 kind could be rerun; the AVX512 entries of the untyped model were dropped. Recorded again
# for AVX512 on 2026-12-05 (Intel Xeon, family 6 model 207, AVX-512 and AMX): every hash equal to AVX2's, the
# probability sums within 3e-10 of them.
DEMO: dict[str, dict[str, object]] = {
    "AVX512": {
        "geojson": "f0d1ed903b9418507225c206182127098c55388be97f5456088ef6c739ff7586",
        "parquet": "bdee071eb8f3b3e6c480e57f53d0ddb0072f80eebfbf3588c3931dc5c41c3e73",
        "zarr": "345f3adbc4f7949178e09d341b12a9d51111890742377c856592b2565f6bab18",
        "probability": 89.46940847113729,
    },
    "AVX2": {
        "geojson": "f0d1ed903b9418507225c206182127098c55388be97f5456088ef6c739ff7586",
        "parquet": "bdee071eb8f3b3e6c480e57f53d0ddb0072f80eebfbf3588c3931dc5c41c3e73",
        "zarr": "345f3adbc4f7949178e09d341b12a9d51111890742377c856592b2565f6bab18",
        "probability": 89.4694084460817,
    },
}
CMU: dict[str, dict[str, object]] = {
    "AVX512": {
        "geojson": "00810f0762d53c779cb39dee82a95e6b3c5984f48a83338806e0e3ca35f432d6",
        "parquet": "fec89851954f4b734b0975eec743480a4cb0b12230ef37332d225035787e2646",
        "zarr": "edc3aad7e97fcb3e0dc7d494e5edb52236e6b7e9d631b16f17dc12b251d1683c",
        "probability": 990.1895715031097,
    },
    "AVX2": {
        "geojson": "00810f0762d53c779cb39dee82a95e6b3c5984f48a83338806e0e3ca35f432d6",
        "parquet": "fec89851954f4b734b0975eec743480a4cb0b12230ef37332d225035787e2646",
        "zarr": "edc3aad7e97fcb3e0dc7d494e5edb52236e6b7e9d631b16f17dc12b251d1683c",
        "probability": 990.1895717442515,
    },
}


def cpu_kind() -> str:
    """The instruction set PyTorch's CPU kernels use here (``AVX2``, ``AVX512``, ``DEFAULT``...)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def recorded(table: dict[str, dict[str, object]]) -> dict[str, object]:
    """This CPU kind's digests; the test is skipped on a kind nobody recorded (the suite's other tests, region
    size, workers, resume, still check exactness within one machine there)."""
    kind = cpu_kind()
    if kind not in table:
        pytest.skip(f"no golden digests recorded for a {kind} CPU (recorded: {', '.join(sorted(table))})")
    return table[kind]


def weighted_sum(p: np.ndarray) -> float:
    """``sum(p_i * i) / n`` over rows i = 1..n: changes when a value changes or two values swap places."""
    p = np.asarray(p, np.float64)
    return float(np.dot(p, np.arange(1, len(p) + 1)) / max(len(p), 1))


def geojson_digest(path: Path, slide: Path) -> tuple[str, float]:
    """SHA-256 of the GeoJSON bytes with each probability value and each feature id masked, and the probabilities'
    weighted sum. The ids are checked here instead: each is ``feature_uuid`` of the slide file's key and the
    feature's nucleus id (so a hash of them would pin the slide file's bytes, not the outputs)."""
    raw = path.read_bytes()
    key = slide_fingerprint(slide)["hex"]
    features = json.loads(raw)["features"]
    for f in features:
        assert f["id"] == feature_uuid(key, f["properties"]["measurements"]["Nucleus ID"])
    assert len(FEATURE_ID.findall(raw)) == len(features)  # every id is masked below
    probs = np.array([float(m.group(2)) for m in PROBABILITY.finditer(raw)])
    masked = FEATURE_ID.sub(rb"\1?\3", PROBABILITY.sub(rb"\1?", raw))
    return hashlib.sha256(masked).hexdigest(), weighted_sum(probs)


def parquet_digest(path: Path) -> tuple[str, float]:
    """SHA-256 of a Parquet table's schema (with metadata) and every column's values but ``probability``,
    and the probabilities' weighted sum."""
    table = pq.read_table(path)
    h = hashlib.sha256()
    h.update(table.schema.to_string(show_schema_metadata=True).encode())
    for name in table.column_names:
        if name != "probability":
            h.update(f"\0{name}\0{table.column(name).to_pylist()!r}".encode())
    return h.hexdigest(), weighted_sum(table.column("probability").to_numpy())


def zarr_digest(path: Path) -> str:
    """SHA-256 of every ``.zattrs`` (parsed) and every array's shape, chunks, dtype and decoded values."""
    h = hashlib.sha256()
    for f in sorted(path.rglob(".zattrs")):
        h.update(f"{f.relative_to(path).as_posix()}\0".encode())
        h.update(json.dumps(json.loads(f.read_text()), sort_keys=True).encode())
    for f in sorted(path.rglob(".zarray")):
        rel = f.parent.relative_to(path).as_posix()
        arr = zarr.open_array(str(f.parent), mode="r")
        data = np.ascontiguousarray(arr[...])
        h.update(f"{rel}\0{arr.shape}\0{arr.chunks}\0{data.dtype.str}\0".encode())
        h.update(data.tobytes())
    return h.hexdigest()


def digests(folder: Path, stem: str, slide: Path) -> dict[str, object]:
    """The digests of one slide's output folder (see the module docstring)."""
    geo, geo_p = geojson_digest(folder / f"{stem}.geojson", slide)
    par, par_p = parquet_digest(folder / f"{stem}.nuclei.parquet")
    assert geo_p == pytest.approx(par_p, rel=1e-12)  # one table behind both files
    return {"geojson": geo, "parquet": par, "zarr": zarr_digest(folder / f"{stem}.zarr"), "probability": par_p}


def check(got: dict[str, object], want: dict[str, object]) -> None:
    """Hashes equal, probability sum within ``REL_TOL`` (the digests ``want`` records; see ``DEMO``)."""
    exact = {k: v for k, v in got.items() if k != "probability" and k in want}
    assert exact == {k: v for k, v in want.items() if k != "probability"}, f"got {got}"
    assert got["probability"] == pytest.approx(want["probability"], rel=REL_TOL), f"got {got}"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The embedded demo slide (1024 px, seed 3), in 4 regions so that stitching is exercised: (output, slide)."""
    recorded(DEMO)  # skip before running the slide where there is nothing to compare with
    root = tmp_path_factory.mktemp("golden_demo")
    slide = make_demo_slide(root / "demo.tif", 1024, 3)
    assert main(["segment", str(slide), "-o", str(root / "out"), "--region-size", "256", *FLAGS]) == 0
    return root / "out" / "demo", slide


@pytest.fixture(scope="module")
def cmu_out(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """CMU-1-Small-Region (a real Aperio slide, 9 regions at the default size): (output, slide)."""
    recorded(CMU)
    slide = shared_data / "slides" / "aperio-cmu1-small" / "CMU-1-Small-Region.svs"
    out = tmp_path_factory.mktemp("golden_cmu") / "out"
    assert main(["segment", str(slide), "-o", str(out), *FLAGS]) == 0
    return out / "CMU-1-Small-Region", slide


def test_demo_outputs_are_golden(demo_out: tuple[Path, Path]) -> None:
    check(digests(demo_out[0], "demo", demo_out[1]), recorded(DEMO))


@pytest.mark.slow
def test_cmu_small_region_outputs_are_golden(cmu_out: tuple[Path, Path]) -> None:
    check(digests(cmu_out[0], "CMU-1-Small-Region", cmu_out[1]), recorded(CMU))
