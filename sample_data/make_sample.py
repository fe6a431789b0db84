#!/usr/bin/env python
"""Generate the embedded demo slide: synthetic H&E tissue with exact nuclei ground truth.

Usage::

    python sample_data/make_sample.py [OUT.tif] [--size 4096] [--seed 0]

Writes ``OUT.tif`` (pyramidal tiled TIFF at 0.25 µm/px, i.e. 40x, through
``histoseg.io.write_pyramidal_tiff``), ``OUT.npz`` (``labels`` uint32 instance map at level-0 resolution,
``classes`` uint8 per instance, ``centroids`` float64 (x, y) level-0 px, ``class_names``) and ``OUT.json``
(size, mpp, seed, counts).  Instance ``i`` (1-based) of ``labels`` is row ``i - 1`` of ``classes`` and
``centroids``.  Centroids follow ``histoseg.postprocess.instance_centroids``: pixel ``j`` spans
``[j, j + 1)``, so a centroid is the mean pixel index + 0.5 and ``floor`` of it is a pixel of its nucleus.

Classes: 1 epithelial, 2 lymphocyte/inflammatory, 3 stromal/fibroblast, 4 other (endothelial, plasma-like).

How the picture is made (all sizes at 0.25 µm/px), one sibling module per step:

1. ``synth_scene.py`` -- *scene* (global, one seeded RNG): tissue outline, glands, epithelial nests, vessels,
   slowly varying fields; ``synth_common.py`` holds the shared constants and the star-shaped outline.
2. ``synth_nuclei.py`` -- *nuclei* (global, before any pixel is rendered, so no nucleus is cut by a tile
   seam): per-class shape and staining, dart-throwing placement, stamped hematoxylin profile.
3. ``synth_render.py`` -- *render* in row strips: Beer-Lambert H&E composition, textures, blur and noise
   from seeded noise tiles, so the pixels do not depend on the strip height.

``sample_data`` is a package: import ``sample_data.make_sample`` from the repository root, or run this file
(``python sample_data/make_sample.py`` or ``python -m sample_data.make_sample``); run as a file, the siblings
are imported by plain name from this folder (the first entry of ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:  # imported from the package (python -m sample_data.make_sample, tests)
    from sample_data.synth_common import CLASS_NAMES, MAGNIFICATION, MPP
    from sample_data.synth_render import E_VEC, H_VEC, RowSource, render
    from sample_data.synth_scene import Scene, build_scene
except ModuleNotFoundError:  # run as python sample_data/make_sample.py: this folder is sys.path[0]
    from synth_common import CLASS_NAMES, MAGNIFICATION, MPP
    from synth_render import E_VEC, H_VEC, RowSource, render
    from synth_scene import Scene, build_scene

GENERATOR_VERSION = 1
DEFAULT_SIZE = 4096

Writer = Callable[..., Any]


def generate(width: int, height: int, seed: int = 0) -> tuple[Scene, np.ndarray]:
    """Scene (with ground truth) and RGB pixels of a synthetic slide."""
    scene = build_scene(width, height, seed)
    return scene, render(scene)


def _histoseg_writer() -> Writer:
    from histoseg.io import write_pyramidal_tiff

    fn: Writer = write_pyramidal_tiff
    return fn


def summary(scene: Scene) -> dict[str, Any]:
    """The JSON description written beside the slide."""
    counts = np.bincount(scene.classes, minlength=len(CLASS_NAMES) + 1)
    return {
        "generator": "sample_data/make_sample.py",
        "generator_version": GENERATOR_VERSION,
        "width": scene.width,
        "height": scene.height,
        "size": [scene.width, scene.height],
        "mpp": MPP,
        "magnification": MAGNIFICATION,
        "seed": scene.seed,
        "nucleus_count": int(scene.classes.size),
        "class_names": {str(i + 1): n for i, n in enumerate(CLASS_NAMES)},
        "class_counts": {n: int(counts[i + 1]) for i, n in enumerate(CLASS_NAMES)},
        "tissue_fraction": round(scene.tissue_fraction, 4),
        "centroid_convention": "(x, y) level-0 px; pixel j spans [j, j+1) (mean index + 0.5)",
        "stain_vectors": {"hematoxylin": H_VEC.round(4).tolist(), "eosin": E_VEC.round(4).tolist()},
    }


def write_sample(
    out: str | Path, width: int, height: int, seed: int = 0, *, writer: Writer | None = None
) -> dict[str, Any]:
    """Generate and write ``out`` (TIFF), ``out.npz`` and ``out.json``; returns the JSON dictionary."""
    out = Path(out)
    write = writer if writer is not None else _histoseg_writer()
    out.parent.mkdir(parents=True, exist_ok=True)
    scene = build_scene(width, height, seed)
    write(out, RowSource(scene), (width, height), MPP, magnification=MAGNIFICATION)
    np.savez_compressed(
        out.with_suffix(".npz"),
        labels=scene.labels,
        classes=scene.classes,
        centroids=scene.centroids,
        class_names=np.array(CLASS_NAMES),
    )
    meta = summary(scene)
    meta["files"] = {"image": out.name, "ground_truth": out.with_suffix(".npz").name}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or WxH, got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 256:
        raise argparse.ArgumentTypeError(f"size must be N or WxH with sides >= 256, got {text!r}")
    return vals[0], vals[1]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "out",
        nargs="?",
        default=str(Path(__file__).resolve().parent / "sample.tif"),
        help="output TIFF (default: sample_data/sample.tif); .npz and .json are written beside it",
    )
    ap.add_argument(
        "--size",
        type=_parse_size,
        default=(DEFAULT_SIZE, DEFAULT_SIZE),
        help="side in px, or WxH (default 4096)",
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    meta = write_sample(args.out, args.size[0], args.size[1], args.seed)
    dt = time.perf_counter() - t0
    print(
        f"wrote {args.out} ({meta['width']}x{meta['height']} px at {MPP} µm/px, seed {meta['seed']}, "
        f"{meta['nucleus_count']} nuclei, tissue {meta['tissue_fraction']:.0%}) in {dt:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
