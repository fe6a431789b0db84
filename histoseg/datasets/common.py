"""The ``Sample`` type and what every dataset reader shares: folders, image/mask decoding, rescaling.

Every reader rescales image and labels to a requested pixel size (``target_mpp``, µm/px; ``None`` keeps the
native size): images with ``cv2.INTER_AREA`` when shrinking and ``cv2.INTER_LINEAR`` when enlarging, label
maps with nearest neighbour, points by mapping pixel centres (:func:`rescale`).

Coordinates: points are ``(x, y)`` in 0-based pixel-centre coordinates (pixel ``(r, c)`` has its centre at
``x = c, y = r``), the convention of numpy indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from histoseg.config import data_dir
from histoseg.errors import DatasetError


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


def dataset_root(root: Path | str | None, folder: str) -> Path:
    """``root`` if given, else ``<data_dir>/nuclei/<folder>``; a missing folder raises DatasetError."""
    base = Path(root) if root is not None else data_dir() / "nuclei" / folder
    if not base.is_dir():
        raise DatasetError(
            f"dataset folder not found: {base} (set HISTOSEG_DATA to the shared data folder, or pass root=)"
        )
    return base


def require_dir(path: Path) -> Path:
    """``path`` if it is a folder; a clear DatasetError otherwise (not an empty glob later)."""
    if not path.is_dir():
        raise DatasetError(f"dataset folder not found: {path}")
    return path


def read_rgb(path: Path) -> np.ndarray:
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


def read_mask(path: Path) -> np.ndarray:
    """Read a mask image as (H, W) bool: any non-zero grey value is foreground."""
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


def clip_points(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Clip 0-based pixel-centre points into ``[0, w - 1] x [0, h - 1]``."""
    out = points.astype(np.float64, copy=True)
    out[:, 0] = np.clip(out[:, 0], 0.0, shape[1] - 1.0)
    out[:, 1] = np.clip(out[:, 1], 0.0, shape[0] - 1.0)
    return out


def relabel(inst: np.ndarray) -> np.ndarray:
    """Renumber instance ids to 1..N in order of first appearance of the old ids (sorted), 0 kept."""
    ids = np.unique(inst)
    ids = ids[ids != 0]
    if len(ids) == 0 or ids[-1] == len(ids):
        return inst.astype(np.int32, copy=False)
    lut = np.zeros(int(ids[-1]) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    out: np.ndarray = lut[inst]
    return out


def rescale(sample: Sample, target_mpp: float | None) -> Sample:
    """Rescale a native-resolution sample (image, label maps, points) to ``target_mpp``."""
    src = sample.image.shape
    shape = _target_shape(src, sample.mpp, target_mpp)
    if shape == src[:2]:
        return sample
    inst = relabel(resize_labels(sample.inst, shape)) if sample.inst is not None else None
    points = (
        clip_points(scale_points(sample.points, src, shape), shape) if sample.points is not None else None
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
