"""Seeded training augmentation of ``Sample``s and batching into arrays ready for torch.

Geometric steps (crop with padding, scale change, 90° rotations, flips) move the image, every label map
and the points together; photometric steps (HED stain jitter, brightness/contrast, blur) touch the image
only. Targets (NP, HV, TP) are computed after the geometric steps from the augmented maps, so HV values
always describe the instances as they lie in the crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from skimage.color import hed_from_rgb, rgb_from_hed

from histoseg.datasets import Sample, resize_image, resize_labels, scale_points
from histoseg.training.targets import hv_maps, np_target

FLAG_KEYS = ("has_inst", "has_semantic", "has_np", "has_types", "has_points")


def _window(arr: np.ndarray, y0: int, x0: int, h: int, w: int, fill: int | bool) -> np.ndarray:
    """The (h, w) window of ``arr`` at (y0, x0) (may reach outside: filled with ``fill``)."""
    out = np.full((h, w, *arr.shape[2:]), fill, dtype=arr.dtype)
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + h, arr.shape[0]), min(x0 + w, arr.shape[1])
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def _rot90_points(points: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    """Points after ``np.rot90(arr, k)`` of an array of (h, w) ``shape`` (counter-clockwise turns)."""
    pts = points.astype(np.float64, copy=True)
    h, w = shape
    for _ in range(k % 4):
        pts = np.stack([pts[:, 1], (w - 1) - pts[:, 0]], axis=1)
        h, w = w, h
    return pts


STRONG_PHOTOMETRIC: dict[str, float | tuple[float, float]] = {
    "hed_scale": 0.3,
    "hed_shift": 0.1,
    "brightness": 0.15,
    "contrast": 0.3,
    "blur_prob": 0.4,
    "blur_sigma": (0.1, 1.6),
}
"""Colour augmentation of the student's unlabeled crops in consistency distillation (``distill_strong``):
three times the default stain jitter, twice the shift, brightness and contrast, more and stronger blur,
about the spread between H&E labs and scanners (the default's is about that within one lab)."""


class Augmenter:
    """Random crop + geometric + photometric augmentation driven by one ``numpy.random.Generator``.

    The same generator state and sample give the same output. ``crop_size`` is (h, w) or an int; images
    smaller than the crop window are padded with white (labels with 0) at a random offset. The scale change
    (probability ``scale_prob``, factor log-uniform in ``scale_range``, > 1 enlarges) reads a window of
    ``crop / factor`` and resizes it to the crop (labels nearest). Rotations by multiples of 90° and a
    horizontal flip together cover all 8 square symmetries (non-square crops only turn by 0 or 180°).
    HED jitter multiplies each stain concentration by ``1 + U(-hed_scale, hed_scale)`` and adds
    ``U(-hed_shift, hed_shift)`` (natural-log optical density), using the Ruifrok-Johnston matrices of
    ``skimage.color`` without clipping, so a zero jitter is lossless.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        crop_size: int | tuple[int, int] = 256,
        *,
        flip: bool = True,
        rotate90: bool = True,
        scale_range: tuple[float, float] = (0.8, 1.25),
        scale_prob: float = 0.5,
        hed_scale: float = 0.1,
        hed_shift: float = 0.05,
        brightness: float = 0.08,
        contrast: float = 0.15,
        blur_prob: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 1.2),
    ) -> None:
        self.rng = rng
        self.crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(self.crop) != 2 or min(self.crop) < 1:
            raise ValueError(f"crop_size must be a positive int or (h, w), got {crop_size}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.flip, self.rotate90 = flip, rotate90
        self.scale_range, self.scale_prob = scale_range, scale_prob
        self.hed_scale, self.hed_shift = hed_scale, hed_shift
        self.brightness, self.contrast = brightness, contrast
        self.blur_prob, self.blur_sigma = blur_prob, blur_sigma

    def __call__(self, sample: Sample) -> Sample:
        """Return an augmented crop of ``sample`` (geometric steps, then image-only steps)."""
        out = self.geometric(sample)
        out.image = self.photometric(out.image)
        return out

    # ------------------------------------------------------------------------------------------ geometry

    def geometric(self, sample: Sample) -> Sample:
        """Crop, scale, rotate and flip the image, label maps and points consistently."""
        ch, cw = self.crop
        rng = self.rng
        factor = 1.0
        if self.scale_prob > 0 and rng.random() < self.scale_prob:
            lo, hi = np.log(self.scale_range[0]), np.log(self.scale_range[1])
            factor = float(np.exp(rng.uniform(lo, hi)))
        wh, ww = max(1, round(ch / factor)), max(1, round(cw / factor))
        h, w = sample.image.shape[:2]
        y0 = int(rng.integers(min(0, h - wh), max(0, h - wh) + 1))
        x0 = int(rng.integers(min(0, w - ww), max(0, w - ww) + 1))
        k = 0
        if self.rotate90:
            k = int(rng.integers(0, 4)) if ch == cw else 2 * int(rng.integers(0, 2))
        flip = bool(self.flip and rng.random() < 0.5)

        def labels(arr: np.ndarray | None) -> np.ndarray | None:
            if arr is None:
                return None
            win = resize_labels(_window(arr, y0, x0, wh, ww, 0), (ch, cw))
            win = np.rot90(win, k)
            return np.ascontiguousarray(win[:, ::-1] if flip else win)

        image = resize_image(_window(sample.image, y0, x0, wh, ww, 255), (ch, cw))
        image = np.rot90(image, k)
        image = np.ascontiguousarray(image[:, ::-1] if flip else image)

        points, classes = sample.points, sample.point_classes
        if points is not None:
            pts = points.astype(np.float64) - np.array([x0, y0], dtype=np.float64)
            pts = scale_points(pts, (wh, ww), (ch, cw))
            pts = _rot90_points(pts, k, (ch, cw))
            if flip:
                pts[:, 0] = (image.shape[1] - 1) - pts[:, 0]
            inside = (
                (pts[:, 0] >= -0.5)
                & (pts[:, 0] < image.shape[1] - 0.5)
                & (pts[:, 1] >= -0.5)
                & (pts[:, 1] < image.shape[0] - 0.5)
            )
            points = pts[inside]
            classes = classes[inside] if classes is not None else None

        return Sample(
            name=sample.name,
            image=image,
            inst=labels(sample.inst),
            semantic=labels(sample.semantic),
            points=points,
            point_classes=classes,
            types=labels(sample.types),
            mpp=sample.mpp * ww / cw,
            source=sample.source,
        )

    # ------------------------------------------------------------------------------------------- colour

    def photometric(self, image: np.ndarray) -> np.ndarray:
        """HED stain jitter, brightness/contrast and optional gaussian blur of an (H, W, 3) uint8 image."""
        rng = self.rng
        alpha = 1.0 + rng.uniform(-self.hed_scale, self.hed_scale, size=3)
        beta = rng.uniform(-self.hed_shift, self.hed_shift, size=3)
        c = 1.0 + rng.uniform(-self.contrast, self.contrast)
        b = rng.uniform(-self.brightness, self.brightness)
        blur = self.blur_prob > 0 and rng.random() < self.blur_prob
        sigma = rng.uniform(*self.blur_sigma)

        od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
        conc = od @ hed_from_rgb.astype(np.float32)
        conc = conc * alpha.astype(np.float32) + beta.astype(np.float32)
        rgb = (256.0 * np.exp(-(conc @ rgb_from_hed.astype(np.float32))) - 1.0) / 255.0
        mean = float(rgb.mean())
        rgb = (rgb - mean) * c + mean + b
        if blur:
            rgb = cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma, sigmaY=sigma)
        out: np.ndarray = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
        return out


# ------------------------------------------------------------------------------------------------- batch


@dataclass
class Batch:
    """Arrays of B augmented crops, ready for ``torch.from_numpy``.

    ``image`` (B, 3, h, w) float32 in [0, 1]; ``np_map`` (B, h, w) uint8; ``hv`` (B, 2, h, w) float32;
    ``tp`` (B, h, w) uint8; ``flags[key]`` (B,) bool for ``has_inst`` (NP and HV valid), ``has_semantic``
    (semantic only: NP valid, HV not), ``has_np`` (either), ``has_types`` (TP valid), ``has_points``.
    Targets a sample lacks are zeros: mask them out of the loss with the flags. ``points`` and
    ``point_classes`` are per-sample lists (entries None where absent).
    """

    image: np.ndarray
    np_map: np.ndarray
    hv: np.ndarray
    tp: np.ndarray
    flags: dict[str, np.ndarray]
    names: list[str] = field(default_factory=list)
    points: list[np.ndarray | None] = field(default_factory=list)
    point_classes: list[np.ndarray | None] = field(default_factory=list)


def sample_flags(sample: Sample) -> dict[str, bool]:
    """Which labels a sample carries (``FLAG_KEYS``); ``has_np`` = ``has_inst or has_semantic``."""
    has_inst = sample.inst is not None
    has_semantic = not has_inst and sample.semantic is not None
    return {
        "has_inst": has_inst,
        "has_semantic": has_semantic,
        "has_np": has_inst or has_semantic,
        "has_types": sample.types is not None,
        "has_points": sample.points is not None,
    }


def make_targets(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image (3, h, w) float32 [0, 1], NP (h, w) uint8, HV (2, h, w) float32, TP (h, w) uint8) of a crop.

    NP comes from ``inst``, else ``semantic``; HV from ``inst``; TP from ``types``; missing ones are zeros.
    """
    h, w = sample.image.shape[:2]
    image = np.ascontiguousarray(sample.image.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    if sample.inst is not None:
        np_map, hv = np_target(sample.inst), hv_maps(sample.inst)
    else:
        hv = np.zeros((2, h, w), dtype=np.float32)
        np_map = np_target(sample.semantic) if sample.semantic is not None else np.zeros((h, w), np.uint8)
    tp = sample.types.astype(np.uint8) if sample.types is not None else np.zeros((h, w), np.uint8)
    return image, np_map, hv, tp


def random_crop_batch(
    samples: Sequence[Sample],
    augmenter: Augmenter,
    batch_size: int,
    indices: Sequence[int] | None = None,
) -> Batch:
    """Draw ``batch_size`` samples (with replacement, from ``augmenter.rng``; or the given ``indices``),
    augment each and stack images and targets (HV computed after the geometric steps)."""
    if not samples:
        raise ValueError("no samples to draw from")
    if indices is None:
        indices = [int(i) for i in augmenter.rng.integers(0, len(samples), size=batch_size)]
    crops = [augmenter(samples[i]) for i in indices]
    parts = [make_targets(c) for c in crops]
    flags = [sample_flags(c) for c in crops]
    return Batch(
        image=np.stack([p[0] for p in parts]),
        np_map=np.stack([p[1] for p in parts]),
        hv=np.stack([p[2] for p in parts]),
        tp=np.stack([p[3] for p in parts]),
        flags={key: np.array([f[key] for f in flags], dtype=bool) for key in FLAG_KEYS},
        names=[c.name for c in crops],
        points=[c.points for c in crops],
        point_classes=[c.point_classes for c in crops],
    )
