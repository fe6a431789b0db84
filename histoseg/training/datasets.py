"""Readers of the shared nuclei datasets (MoNuSeg 2018, DSB 2018 H&E subset, CRCHisto) into ``Sample``s.

Every reader rescales image and labels to a requested pixel size (``target_mpp``, µm/px; ``None`` keeps the
native size): images with ``cv2.INTER_AREA`` when shrinking and ``cv2.INTER_LINEAR`` when enlarging, label
maps with nearest neighbour, points by mapping pixel centres. Readers keep no cache and return samples in
sorted-name order. A missing folder raises :class:`histoseg.errors.DatasetError`.

Coordinates: points are ``(x, y)`` in 0-based pixel-centre coordinates (pixel ``(r, c)`` has its centre at
``x = c, y = r``), the convention of numpy indexing.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import scipy.io
from scipy.optimize import linear_sum_assignment

from histoseg.config import data_dir
from histoseg.errors import DatasetError

MONUSEG_DEFAULT_MPP = 0.25
"""Pixel size used for MoNuSeg training images whose XML (with ``MicronsPerPixel``) is absent: 40x
nominal; the per-file XML values span 0.2456-0.2527 µm/px, so the error is below 2 %."""

CRCHISTO_MPP = 0.55
CRCHISTO_CLASSES = ("epithelial", "fibroblast", "inflammatory", "others")
"""CRCHisto class files in label order: epithelial=1, fibroblast=2, inflammatory=3, others=4 (0: no class)."""

CRCHISTO_MATCH_RADIUS = 10.0
"""Largest distance (native px, ~5.5 µm, about one nucleus radius) at which a class point that is not an
exact copy of a detection point is still taken as the same nucleus."""


@dataclass(eq=False, kw_only=True)
class Sample:
    """One annotated image at a known pixel size; absent label kinds are ``None`` (keyword-only fields).

    ``inst``: (H, W) int32 instance ids, 0 background. ``semantic``: (H, W) bool nucleus pixels, only for
    images without instance labels. ``points``: (N, 2) float64 ``(x, y)`` nucleus centres, 0-based
    pixel-centre coordinates. ``point_classes``: (N,) int64, 1..4 (0 = nucleus without class label).
    ``types``: (H, W) uint8 type map. ``mpp``: effective µm/px of the stored arrays.
    """

    name: str
    image: np.ndarray
    inst: np.ndarray | None = None
    semantic: np.ndarray | None = None
    points: np.ndarray | None = None
    point_classes: np.ndarray | None = None
    types: np.ndarray | None = None
    mpp: float
    source: str = ""


# ----------------------------------------------------------------------------------------------- helpers


def _dataset_root(root: Path | str | None, folder: str) -> Path:
    base = Path(root) if root is not None else data_dir() / "nuclei" / folder
    if not base.is_dir():
        raise DatasetError(
            f"dataset folder not found: {base} (set HISTOSEG_DATA to the shared data folder, or pass root=)"
        )
    return base


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DatasetError(f"dataset folder not found: {path}")
    return path


def _read_rgb(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (alpha dropped, grey expanded)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(f"cannot read image {path}")
    if img.dtype != np.uint8:
        raise DatasetError(f"{path}: expected 8-bit image, got {img.dtype}")
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    code = cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return np.ascontiguousarray(cv2.cvtColor(img, code))


def _read_mask(path: Path) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if m is None:
        raise DatasetError(f"cannot read mask {path}")
    return m > 0


def _target_shape(shape: tuple[int, ...], mpp: float, target_mpp: float | None) -> tuple[int, int]:
    h, w = shape[:2]
    if target_mpp is None or target_mpp == mpp:
        return h, w
    if target_mpp <= 0:
        raise DatasetError(f"target_mpp must be positive, got {target_mpp}")
    f = mpp / target_mpp
    return max(1, round(h * f)), max(1, round(w * f))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an image to (h, w): INTER_AREA when shrinking, INTER_LINEAR when enlarging."""
    h, w = shape
    if (h, w) == image.shape[:2]:
        return image
    shrink = h * w < image.shape[0] * image.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interp)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a label map (int, uint8 or bool) to (h, w) with nearest neighbour, keeping the dtype.

    ``INTER_NEAREST_EXACT`` samples at pixel centres like the image interpolations (plain
    ``INTER_NEAREST`` is shifted by up to half a pixel).
    """
    h, w = shape
    if (h, w) == labels.shape[:2]:
        return labels
    src = labels.view(np.uint8) if labels.dtype == np.bool_ else labels
    out = cv2.resize(src, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return out.view(np.bool_) if labels.dtype == np.bool_ else out


def scale_points(points: np.ndarray, src_shape: tuple[int, ...], dst_shape: tuple[int, ...]) -> np.ndarray:
    """Map 0-based pixel-centre ``(x, y)`` points from an image of ``src_shape`` to one of ``dst_shape``."""
    fy = dst_shape[0] / src_shape[0]
    fx = dst_shape[1] / src_shape[1]
    out = np.empty_like(points, dtype=np.float64)
    out[:, 0] = (points[:, 0] + 0.5) * fx - 0.5
    out[:, 1] = (points[:, 1] + 0.5) * fy - 0.5
    return out


def _clip_points(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Clip 0-based pixel-centre points into ``[0, w - 1] x [0, h - 1]``."""
    out = points.astype(np.float64, copy=True)
    out[:, 0] = np.clip(out[:, 0], 0.0, shape[1] - 1.0)
    out[:, 1] = np.clip(out[:, 1], 0.0, shape[0] - 1.0)
    return out


def _relabel(inst: np.ndarray) -> np.ndarray:
    """Renumber instance ids to 1..N in order of first appearance of the old ids (sorted), 0 kept."""
    ids = np.unique(inst)
    ids = ids[ids != 0]
    if len(ids) == 0 or ids[-1] == len(ids):
        return inst.astype(np.int32, copy=False)
    lut = np.zeros(int(ids[-1]) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[inst]


def _rescale(sample: Sample, target_mpp: float | None) -> Sample:
    """Rescale a native-resolution sample (image, label maps, points) to ``target_mpp``."""
    src = sample.image.shape
    shape = _target_shape(src, sample.mpp, target_mpp)
    if shape == src[:2]:
        return sample
    inst = _relabel(resize_labels(sample.inst, shape)) if sample.inst is not None else None
    points = (
        _clip_points(scale_points(sample.points, src, shape), shape) if sample.points is not None else None
    )
    return Sample(
        name=sample.name,
        image=resize_image(sample.image, shape),
        inst=inst,
        semantic=resize_labels(sample.semantic, shape) if sample.semantic is not None else None,
        points=points,
        point_classes=sample.point_classes,
        types=resize_labels(sample.types, shape) if sample.types is not None else None,
        mpp=sample.mpp * src[1] / shape[1],
        source=sample.source,
    )


# ---------------------------------------------------------------------------------------------- MoNuSeg


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
    return _relabel(inst)


def load_monuseg(
    split: Literal["train", "test"], target_mpp: float | None, root: Path | str | None = None
) -> list[Sample]:
    """Load MoNuSeg 2018 ``train`` (30 JPEG tiles) or ``test`` (14 PNG tiles), 40x, 1000x1000.

    Images with an Aperio XML get ``inst`` (polygons rasterised, later regions overwrite earlier) and the
    XML's ``MicronsPerPixel``; training images without XML (17 of 30 in the shared snapshot) get
    ``semantic`` from ``Binary_masks/`` (touching nuclei merged) and ``MONUSEG_DEFAULT_MPP``.
    """
    base = _dataset_root(root, "monuseg2018")
    if split == "test":
        folder = _require_dir(base / "MoNuSegTestData")
        images, xml_dir, mask_dir = sorted(folder.glob("*.png")), folder, None
    elif split == "train":
        folder = _require_dir(base / "MoNuSegTrainingData")
        images = sorted(_require_dir(folder / "Tissue_Images").glob("*.jpg"))
        xml_dir, mask_dir = folder / "Annotations", folder / "Binary_masks"
    else:
        raise DatasetError(f"unknown MoNuSeg split {split!r}; use 'train' or 'test'")
    if not images:
        raise DatasetError(f"no MoNuSeg {split} images in {folder}")
    out = []
    for img_path in images:
        name = img_path.stem
        image = _read_rgb(img_path)
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
            semantic = _read_mask(mask_dir / f"{name}.png")
            if semantic.shape != image.shape[:2]:
                raise DatasetError(f"{name}: mask shape {semantic.shape} != image {image.shape[:2]}")
            sample = Sample(
                name=name, image=image, semantic=semantic, mpp=MONUSEG_DEFAULT_MPP, source="monuseg2018"
            )
        else:
            raise DatasetError(f"MoNuSeg {split} image {name} has neither an XML nor a binary mask")
        out.append(_rescale(sample, target_mpp))
    return out


# -------------------------------------------------------------------------------------------------- DSB


def load_dsb(
    target_mpp: float | None, source_mpp: float = 0.5, root: Path | str | None = None
) -> list[Sample]:
    """Load the DSB 2018 H&E subset (106 images 256x320, one mask PNG per nucleus) as instance maps.

    The dataset gives no magnification (it varies between images); ``source_mpp`` is an explicit
    assumption of the native pixel size (default 0.5 µm/px, i.e. roughly 20x, which matches the typical
    nucleus size in these tiles). RGBA images lose their (opaque) alpha channel. Mask files are labelled
    1..N in sorted file-name order; they do not overlap (a later mask would win).
    """
    base = _require_dir(_dataset_root(root, "dsb2018-he") / "stage1_train")
    dirs = sorted(p for p in base.iterdir() if p.is_dir())
    if not dirs:
        raise DatasetError(f"no DSB images in {base}")
    out = []
    for d in dirs:
        img_path = d / "images" / f"{d.name}.png"
        if not img_path.is_file():
            raise DatasetError(f"DSB image missing: {img_path}")
        image = _read_rgb(img_path)
        inst = np.zeros(image.shape[:2], dtype=np.int32)
        for label, mask_path in enumerate(sorted((d / "masks").glob("*.png")), start=1):
            mask = _read_mask(mask_path)
            if mask.shape != inst.shape:
                raise DatasetError(f"{mask_path}: shape {mask.shape} != image {inst.shape}")
            inst[mask] = label
        sample = Sample(name=d.name, image=image, inst=_relabel(inst), mpp=source_mpp, source="dsb2018-he")
        out.append(_rescale(sample, target_mpp))
    return out


# --------------------------------------------------------------------------------------------- CRCHisto


def _load_mat_points(path: Path) -> np.ndarray:
    """(N, 2) float64 points of a CRCHisto ``.mat`` file (key ``detection``), as stored (1-based)."""
    if not path.is_file():
        raise DatasetError(f"CRCHisto annotation missing: {path}")
    mat = scipy.io.loadmat(str(path))
    if "detection" not in mat:
        raise DatasetError(f"{path}: no 'detection' array")
    return np.asarray(mat["detection"], dtype=np.float64).reshape(-1, 2)


def _crchisto_points(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Detection points with classes: exact duplicates dropped, class points matched one-to-one."""
    det = _load_mat_points(folder / f"{name}_detection.mat")
    _, first = np.unique(det, axis=0, return_index=True)
    det = det[np.sort(first)]
    cls_pts = [_load_mat_points(folder / f"{name}_{c}.mat") for c in CRCHISTO_CLASSES]
    cls = np.concatenate(cls_pts)
    cls_label = np.concatenate([np.full(len(p), i + 1, dtype=np.int64) for i, p in enumerate(cls_pts)])
    _, first = np.unique(cls, axis=0, return_index=True)  # same spot in two files: first class wins
    keep = np.sort(first)
    cls, cls_label = cls[keep], cls_label[keep]
    classes = np.zeros(len(det), dtype=np.int64)
    matched = np.zeros(len(cls), dtype=bool)
    if len(cls) and len(det):
        dist = np.hypot(cls[:, None, 0] - det[None, :, 0], cls[:, None, 1] - det[None, :, 1])
        # Minimum total distance; pairs farther than the radius are forbidden by a huge cost.
        cost = np.where(dist <= CRCHISTO_MATCH_RADIUS, dist, 1e6)
        rows, cols = linear_sum_assignment(cost)
        ok = dist[rows, cols] <= CRCHISTO_MATCH_RADIUS
        classes[cols[ok]] = cls_label[rows[ok]]
        matched[rows[ok]] = True
    points = np.concatenate([det, cls[~matched]])
    classes = np.concatenate([classes, cls_label[~matched]])
    return points, classes


def load_crchisto(
    split: Literal["train", "validation"],
    target_mpp: float | None,
    root: Path | str | None = None,
    classified_only: bool = False,
) -> list[Sample]:
    """Load CRCHisto ``train`` (70) or ``validation`` (10) 500x500 images with nucleus centre points.

    Points are ``imgN_detection.mat`` (``x`` then ``y``, MATLAB 1-based: 1 is subtracted, then clipped
    into the image; the stored values span 0.15-500.0, and haematoxylin blob centres lie 0.5-0.9 px up and
    left of the raw values, which rules out 0-based). Exact duplicate points are dropped (a class point
    listed twice keeps its first class in file order). Class points
    (epithelial=1, fibroblast=2, inflammatory=3, others=4) are matched one-to-one to detection points
    (optimal assignment, at most ``CRCHISTO_MATCH_RADIUS`` px; nearly all are exact copies); detections with
    no class point get class 0, class points with no detection are appended. ``classified_only=True``
    keeps only points with a class (1..4). Native pixel size ``CRCHISTO_MPP`` (20x, 0.55 µm/px).
    """
    if split not in ("train", "validation"):
        raise DatasetError(f"unknown CRCHisto split {split!r}; use 'train' or 'validation'")
    base = _require_dir(_dataset_root(root, "crchisto") / split)
    dirs = sorted(p for p in base.iterdir() if p.is_dir())
    if not dirs:
        raise DatasetError(f"no CRCHisto images in {base}")
    out = []
    for d in dirs:
        image = _read_rgb(d / f"{d.name}.png")
        points, classes = _crchisto_points(d, d.name)
        points = _clip_points(points - 1.0, image.shape)
        if classified_only:
            keep = classes > 0
            points, classes = points[keep], classes[keep]
        sample = Sample(
            name=d.name,
            image=image,
            points=points,
            point_classes=classes,
            mpp=CRCHISTO_MPP,
            source="crchisto",
        )
        out.append(_rescale(sample, target_mpp))
    return out
