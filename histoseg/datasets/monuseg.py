"""MoNuSeg 2018 reader: Aperio XML polygons rasterised into instance maps, binary masks where XML is absent."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from histoseg.datasets.common import Sample, dataset_root, read_mask, read_rgb, relabel, require_dir, rescale
from histoseg.errors import DatasetError

MONUSEG_DEFAULT_MPP = 0.25
"""Pixel size used for MoNuSeg training images whose XML (with ``MicronsPerPixel``) is absent: 40x
nominal; the per-file XML values span 0.2456-0.2527 µm/px, so the error is below 2 %."""


def parse_aperio_xml(path: Path) -> tuple[float | None, list[np.ndarray]]:
    """Return ``MicronsPerPixel`` (or None) and the (K, 2) float ``(x, y)`` vertices of each Region."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DatasetError(f"{path}: malformed XML ({e})") from e
    mpp_attr = root.get("MicronsPerPixel")
    mpp = float(mpp_attr) if mpp_attr else None
    polys = []
    for region in root.iter("Region"):
        verts = [(float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")]
        polys.append(np.asarray(verts, dtype=np.float64).reshape(-1, 2))
    return mpp, polys


def rasterise_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Fill polygons into an int32 instance map (ids 1..N in order; later polygons overwrite earlier ones).

    Vertices are pixel-centre coordinates; boundary pixels are inside (``cv2.fillPoly``, sub-pixel
    precision). Polygons with fewer than 3 vertices are skipped; ids are renumbered so that instances
    wholly overwritten or outside the image leave no gap.
    """
    shift = 4
    inst = np.zeros(shape, dtype=np.int32)
    label = 0
    for poly in polygons:
        if len(poly) < 3 or not np.isfinite(poly).all():
            continue
        label += 1
        pts = np.round(poly * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(inst, [pts], color=label, lineType=cv2.LINE_8, shift=shift)
    return relabel(inst)


def load_monuseg(
    split: Literal["train", "test"], target_mpp: float | None, root: Path | str | None = None
) -> list[Sample]:
    """Load MoNuSeg 2018 ``train`` (30 JPEG tiles) or ``test`` (14 PNG tiles), 40x, 1000x1000.

    Images with an Aperio XML get ``inst`` (polygons rasterised, later regions overwrite earlier) and the
    XML's ``MicronsPerPixel``; training images without XML (17 of 30 in the shared snapshot) get
    ``semantic`` from ``Binary_masks/`` (touching nuclei merged) and ``MONUSEG_DEFAULT_MPP``.
    """
    base = dataset_root(root, "monuseg2018")
    if split == "test":
        folder = require_dir(base / "MoNuSegTestData")
        images, xml_dir, mask_dir = sorted(folder.glob("*.png")), folder, None
    elif split == "train":
        folder = require_dir(base / "MoNuSegTrainingData")
        images = sorted(require_dir(folder / "Tissue_Images").glob("*.jpg"))
        xml_dir, mask_dir = folder / "Annotations", folder / "Binary_masks"
    else:
        raise DatasetError(f"unknown MoNuSeg split {split!r}; use 'train' or 'test'")
    if not images:
        raise DatasetError(f"no MoNuSeg {split} images in {folder}")
    out = []
    for img_path in images:
        name = img_path.stem
        image = read_rgb(img_path)
        xml = xml_dir / f"{name}.xml"
        if xml.is_file():
            mpp, polys = parse_aperio_xml(xml)
            sample = Sample(
                name=name,
                image=image,
                inst=rasterise_polygons(polys, image.shape[:2]),
                mpp=mpp or MONUSEG_DEFAULT_MPP,
                source="monuseg2018",
            )
        elif mask_dir is not None and (mask_dir / f"{name}.png").is_file():
            semantic = read_mask(mask_dir / f"{name}.png")
            if semantic.shape != image.shape[:2]:
                raise DatasetError(f"{name}: mask shape {semantic.shape} != image {image.shape[:2]}")
            sample = Sample(
                name=name, image=image, semantic=semantic, mpp=MONUSEG_DEFAULT_MPP, source="monuseg2018"
            )
        else:
            raise DatasetError(f"MoNuSeg {split} image {name} has neither an XML nor a binary mask")
        out.append(rescale(sample, target_mpp))
    return out
