"""Point supervision turned into dense pseudo-labels: the Voronoi + k-means baseline of Qu et al. (MIDL 2019).

Qu, Wu, Huang, Yi, Riedlinger, De, Metaxas, "Weakly Supervised Deep Nuclei Segmentation using Points
Annotation in Histopathology Images", MIDL 2019 (PMLR 102:390-400). Two coarse labels come from the centre
points, each marking some pixels nucleus, some background and leaving the rest ignored:

- **Voronoi label**: the Voronoi diagram of the points; pixels on its edges are background (nuclei never
  cross the boundary between two cells, so this separates touching nuclei), pixels within a small disc
  around each point are nucleus, everything else is ignored.
- **Cluster label**: k-means (k = 3) on per-pixel features (distance to the nearest point, truncated, and
  RGB colour). The cluster nearest the points is nucleus, the farthest background, the third ignored. The
  nucleus cluster is cleaned: components smaller than a minimum area dropped, then within each Voronoi
  cell (grown slightly) dilated, hole-filled and eroded by a larger radius. Background is the background
  cluster minus the cleaned nuclei and minus a margin around every point.

How we read the method: from the paper's description and the authors' released data-preparation script (its
``create_Voronoi_label`` and ``create_cluster_label``, read, not copied). Their constants are in pixels of
40x images (0.25 µm/px); here they are µm, so the same settings hold at any pixel size: nucleus disc 2 px =
0.5 µm; distance truncated at 20 px = 5 µm and used in those pixel units beside RGB / 10 (so distance and
colour weigh alike); minimum component 30 px = 1.875 µm²; cells grown by 2 px = 0.5 µm; dilation 5 px = 1.25
µm, erosion 7 px = 1.75 µm; no background within 10 px = 2.5 µm of a point. Voronoi edges are the one-pixel
inner boundary of every cell (a pixel with a 4-neighbour in another cell), as in their script, so they stay
one pixel per side at every mpp. Differences, on purpose: the nucleus cluster is the one with the smallest
mean (truncated) distance and background the largest (their script: most points inside / fewest points
within 5 px); the cleaned nuclei are kept inside their own cell (their union may spill 2 px over a Voronoi
edge), so every nucleus pixel belongs to exactly one point, and only the parts that come within 1.25 µm of
the cell's point (theirs keep every dark blob of the cell: an unclicked nucleus beside a clicked one would
join its instance; here it stays ignored); distances are exact to the sub-pixel point (not a distance
transform of rounded points); our k-means is a seeded k-means++ on at most 32,768 sampled pixels (sklearn's
there).

Combination: they train with the sum of two partial cross-entropies, one per label. Per pixel that is
a target counted once per label that marks it, which :class:`PseudoLabels` carries as one target and a
weight: ``weight`` = (number of the two labels that mark the pixel) / 2, i.e. 1 where both agree, 0.5
where only one marks it, 0 where neither does or where they disagree (nucleus in one, background in the
other; this cannot happen with the constants above below ~3.5 µm/px). Their per-label normalisation (each
loss a mean over its own labelled pixels) is left to the loss. No CRF refinement (their later stage).

With no points at all nothing is known (a crop the annotator did not click is not proof of "no nuclei"):
every pixel is ignored, ``weight`` all 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from histoseg.errors import ConfigError, DatasetError

__all__ = ["PartialLabel", "PseudoLabels", "cluster_label", "voronoi_kmeans_labels", "voronoi_label"]

QU_MPP = 0.25  # pixel size of the 40x images the paper's pixel constants were set for
POINT_RADIUS_UM = 0.5
DIST_CLIP_UM = 5.0
COLOR_SCALE = 0.1
MIN_AREA_UM2 = 30 * QU_MPP**2
CELL_GROW_UM = 0.5
CLOSE_DILATE_UM = 1.25
CLOSE_ERODE_UM = 1.75
BACKGROUND_MARGIN_UM = 2.5
KMEANS_SAMPLE = 32768
KMEANS_RESTARTS = 3
KMEANS_ITERS = 100


@dataclass(frozen=True)
class PseudoLabels:
    """``inst`` (H, W) int32: nucleus pixels carry the id of their Voronoi cell's point (1..N in point order),
    0 elsewhere; ``weight`` (H, W) float32 in [0, 1]: 0 ignored, 0.5 marked by one label, 1 by both."""

    inst: np.ndarray
    weight: np.ndarray


class PartialLabel(NamedTuple):
    """One coarse label: (H, W) bool masks of the pixels it calls nucleus and background (never both)."""

    nucleus: np.ndarray
    background: np.ndarray


class _Geometry(NamedTuple):
    cells: np.ndarray  # (H, W) int32 id (1-based point index) of the nearest point
    dist_um: np.ndarray  # (H, W) float64 distance from the pixel centre to the nearest point
    edges: np.ndarray  # (H, W) bool Voronoi edges
    points: np.ndarray  # (N, 2) float64 points (x, y)


def _disc(radius_px: float) -> np.ndarray:
    r = max(0.0, radius_px)
    k = int(math.floor(r))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    out: np.ndarray = xx * xx + yy * yy <= r * r + 1e-9
    return out


def _check(shape: tuple[int, ...], points_xy: np.ndarray, mpp: float) -> np.ndarray:
    try:
        ok = math.isfinite(float(mpp)) and float(mpp) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    if len(shape) < 2 or shape[0] < 1 or shape[1] < 1:
        raise DatasetError(f"image must be at least 1x1 pixels, got shape {shape}")
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2) if np.size(points_xy) else np.zeros((0, 2))
    if not np.isfinite(pts).all():
        raise DatasetError("points must be finite (x, y) pixel coordinates")
    return pts


def _geometry(shape: tuple[int, int], pts: np.ndarray, mpp: float) -> _Geometry:
    """Nearest point of every pixel centre (pixel (r, c) at x = c, y = r), its distance and the cell edges.

    Exact duplicates keep the first point's id: a repeated point gets no pixels.
    """
    h, w = shape
    uniq, first = np.unique(pts, axis=0, return_index=True)
    yy, xx = np.indices((h, w), dtype=np.float64)
    dist, nearest = cKDTree(uniq).query(np.stack([xx.ravel(), yy.ravel()], axis=1))
    cells = (first[nearest] + 1).astype(np.int32).reshape(h, w)
    edges = np.zeros((h, w), dtype=bool)
    dy = cells[1:, :] != cells[:-1, :]
    dx = cells[:, 1:] != cells[:, :-1]
    edges[1:, :] |= dy
    edges[:-1, :] |= dy
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    return _Geometry(cells, dist.reshape(h, w) * mpp, edges, pts)


def _voronoi(geo: _Geometry, mpp: float) -> PartialLabel:
    h, w = geo.cells.shape
    nucleus = geo.dist_um <= POINT_RADIUS_UM
    r = np.rint(geo.points[:, 1]).astype(np.int64)
    c = np.rint(geo.points[:, 0]).astype(np.int64)
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    nucleus[r[inside], c[inside]] = True  # at coarse mpp the disc may miss every pixel centre
    nucleus &= ~geo.edges
    return PartialLabel(nucleus, geo.edges.copy())


def voronoi_label(shape: tuple[int, int], points_xy: np.ndarray, *, mpp: float) -> PartialLabel:
    """Qu's Voronoi label of an image of ``shape`` (H, W): edges background, a 0.5 µm disc at each point
    (at least the point's own pixel) nucleus unless on an edge. Points are 0-based pixel-centre (x, y)."""
    pts = _check(shape, points_xy, mpp)
    if len(pts) == 0:
        return PartialLabel(np.zeros(shape[:2], bool), np.zeros(shape[:2], bool))
    return _voronoi(_geometry((shape[0], shape[1]), pts, mpp), mpp)


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of every row (one pass per centre: k is 3, rows are many)."""
    d = np.empty((len(x), len(c)))
    for j, cj in enumerate(c):
        d[:, j] = ((x - cj) ** 2).sum(axis=1)
    out: np.ndarray = d.argmin(axis=1)
    return out


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Centres (k, F) of a seeded k-means (k-means++ start, Lloyd steps), best of a few restarts."""
    best, best_cost = np.zeros((k, x.shape[1])), math.inf
    for _ in range(KMEANS_RESTARTS):
        c = x[[int(rng.integers(len(x)))]].astype(np.float64)
        while len(c) < k:
            d2 = ((x - c[_nearest(x, c)]) ** 2).sum(1)
            total = d2.sum()
            pick = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
            c = np.concatenate([c, x[[pick]]])
        assign = _nearest(x, c)
        for _ in range(KMEANS_ITERS):
            counts = np.bincount(assign, minlength=k)
            sums = np.stack([np.bincount(assign, weights=x[:, f], minlength=k) for f in range(x.shape[1])], 1)
            c = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c)  # empty: keep its centre
            new = _nearest(x, c)
            if np.array_equal(new, assign):
                break
            assign = new
        cost = float(((x - c[assign]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = c, cost
    return best


def _clean_nuclei(nuclei: np.ndarray, geo: _Geometry, mpp: float) -> np.ndarray:
    """Drop small components, then per Voronoi cell: dilate, fill holes, erode; keep, inside the cell, the
    parts that come within ``CLOSE_DILATE_UM`` of the cell's point."""
    lab, n = ndimage.label(nuclei, structure=np.ones((3, 3), bool))
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        nuclei = (sizes >= MIN_AREA_UM2 / mpp**2)[lab] & nuclei
    grow, dil, ero = _disc(CELL_GROW_UM / mpp), _disc(CLOSE_DILATE_UM / mpp), _disc(CLOSE_ERODE_UM / mpp)
    pad = (grow.shape[0] + dil.shape[0] + ero.shape[0]) // 2 + 1
    out = np.zeros_like(nuclei)
    h, w = nuclei.shape
    for cid, sl in enumerate(ndimage.find_objects(geo.cells), start=1):
        if sl is None:
            continue
        y0, y1 = max(0, sl[0].start - pad), min(h, sl[0].stop + pad)
        x0, x1 = max(0, sl[1].start - pad), min(w, sl[1].stop + pad)
        own = geo.cells[y0:y1, x0:x1] == cid
        m = nuclei[y0:y1, x0:x1] & ndimage.binary_dilation(own, grow)
        if not m.any():
            continue
        m = ndimage.binary_dilation(m, dil)
        m = ndimage.binary_fill_holes(m)
        m = ndimage.binary_erosion(m, ero, border_value=1) & own
        # only the blob at the point is its nucleus: another dark blob in the cell stays unlabelled
        parts, n_parts = ndimage.label(m, structure=np.ones((3, 3), bool))
        near = geo.dist_um[y0:y1, x0:x1] <= CLOSE_DILATE_UM
        keep = np.zeros(n_parts + 1, bool)
        keep[parts[m & near]] = True
        keep[0] = False
        out[y0:y1, x0:x1] |= keep[parts]
    out &= ~geo.edges
    return out


def _cluster(image: np.ndarray, geo: _Geometry, mpp: float, seed: int) -> PartialLabel:
    h, w = geo.cells.shape
    dist_feat = np.minimum(geo.dist_um, DIST_CLIP_UM) / QU_MPP  # in the paper's pixels: 0..20
    feats = np.concatenate([image.reshape(-1, 3).astype(np.float64) * COLOR_SCALE, dist_feat.reshape(-1, 1)], axis=1)
    rng = np.random.default_rng(seed)
    sample = feats if len(feats) <= KMEANS_SAMPLE else feats[rng.choice(len(feats), KMEANS_SAMPLE, replace=False)]
    centres = _kmeans(sample, 3, rng)
    assign = _nearest(feats, centres).reshape(h, w)
    present = [j for j in range(3) if (assign == j).any()]
    empty = np.zeros((h, w), bool)
    if len(present) < 2:  # a flat image: no contrast to tell nucleus from background
        return PartialLabel(empty, empty.copy())
    mean_d = {j: float(dist_feat[assign == j].mean()) for j in present}
    nuc_j = min(present, key=lambda j: (mean_d[j], j))
    bg_j = max(present, key=lambda j: (mean_d[j], -j))
    nucleus = _clean_nuclei(assign == nuc_j, geo, mpp)
    background = (assign == bg_j) & ~nucleus & (geo.dist_um > BACKGROUND_MARGIN_UM)
    return PartialLabel(nucleus, background)


def _rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise DatasetError(f"image must be (H, W, 3) uint8 RGB, got {img.shape} {img.dtype}")
    return img


def cluster_label(image: np.ndarray, points_xy: np.ndarray, *, mpp: float, seed: int = 0) -> PartialLabel:
    """Qu's cluster label of an (H, W, 3) uint8 RGB image at ``mpp`` with 0-based pixel-centre points."""
    img = _rgb(image)
    pts = _check(img.shape, points_xy, mpp)
    if len(pts) == 0:
        return PartialLabel(np.zeros(img.shape[:2], bool), np.zeros(img.shape[:2], bool))
    return _cluster(img, _geometry((img.shape[0], img.shape[1]), pts, mpp), mpp, seed)


def voronoi_kmeans_labels(image: np.ndarray, points_xy: np.ndarray, *, mpp: float, seed: int = 0) -> PseudoLabels:
    """Voronoi and cluster labels of an image combined into one instance target with per-pixel weights.

    ``image`` (H, W, 3) uint8 RGB at ``mpp`` µm/px; ``points_xy`` (N, 2) nucleus centres, 0-based
    pixel-centre ``(x, y)`` (points outside the image still shape the cells inside it). Nucleus pixels
    (either label says nucleus, neither says background) take their Voronoi cell's point id; ``weight`` is
    the share of the two labels that mark the pixel, 0 where they disagree (module docstring). Deterministic
    for a given ``seed``. No points: ``inst`` and ``weight`` all 0 (everything ignored).
    """
    img = _rgb(image)
    pts = _check(img.shape, points_xy, mpp)
    h, w = img.shape[:2]
    if len(pts) == 0:
        return PseudoLabels(np.zeros((h, w), np.int32), np.zeros((h, w), np.float32))
    geo = _geometry((h, w), pts, mpp)
    vor, clu = _voronoi(geo, mpp), _cluster(img, geo, mpp, seed)
    nuc = vor.nucleus.astype(np.int8) + clu.nucleus
    bg = vor.background.astype(np.int8) + clu.background
    conflict = (nuc > 0) & (bg > 0)
    weight = np.where(conflict, 0.0, np.maximum(nuc, bg) / 2.0).astype(np.float32)
    inst = np.where((nuc > 0) & ~conflict, geo.cells, 0).astype(np.int32)
    return PseudoLabels(inst, weight)
