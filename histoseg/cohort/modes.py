"""Patch modes of the source set: per-patch label histograms clustered by seeded k-means (Tsai et al. 2019).

A source crop's ground-truth instance map is cut into square patches on a regular grid (``patch`` px at the
model's mpp). Each patch is described by the distribution of its pixels over four label classes, background
and nucleus pixels binned by the area of the nucleus they belong to (small / medium / large, bin edges at the
terciles of the source nucleus areas), plus the nucleus density (nuclei whose centroid lies in the patch,
times the median source nucleus area, over the patch area: the fraction the count would cover). These
separate the modes a nuclei image has: empty stroma, sparse large nuclei, dense small lymphocytes, packed
epithelium. MoNuSeg has no nucleus types, so types are not a feature.

The histograms of every source patch are clustered into K modes with k-means (k-means++ seeding, several
restarts, all from one seed); :func:`k_table` measures inertia and silhouette for several K and feature sets
(``python -m benchmarks.cohort --k-table``), the measurement behind the defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from histoseg.cohort.settings import FEATURE_SETS
from histoseg.errors import ConfigError


@dataclass(frozen=True)
class SizeBins:
    """Nucleus-area bin edges (µm²) splitting nuclei into small / medium / large, and the median area."""

    low: float
    high: float
    median: float

    @staticmethod
    def from_instances(maps: Iterable[np.ndarray], mpp: float) -> SizeBins:
        """Terciles and median of the nucleus areas of ``maps`` (instance maps at ``mpp``)."""
        areas = [np.bincount(m.ravel())[1:] for m in maps if m.size]
        counts = np.concatenate(areas).astype(np.float64) if areas else np.zeros(0)
        a = counts[counts > 0] * mpp * mpp
        if not len(a):
            raise ConfigError("the source set holds no nuclei: patch modes cannot be built")
        lo, hi = np.quantile(a, [1 / 3, 2 / 3])
        return SizeBins(float(lo), float(hi), float(np.median(a)))


def patch_features(
    inst: np.ndarray, mpp: float, patch: int, bins: SizeBins, features: str = "size+density", step: int | None = None
) -> np.ndarray:
    """(rows, cols, F) features of the ``patch``-px patches of an instance map, on a grid of ``step`` px.

    Only whole patches count (a crop of side ``n * patch`` gives ``n x n``). See the module text for the
    features; ``step`` smaller than ``patch`` gives overlapping patches (used to cluster the source set)."""
    if features not in FEATURE_SETS:
        raise ConfigError(f"unknown patch features {features!r}; choose from {', '.join(FEATURE_SETS)}")
    step = step or patch
    h, w = inst.shape
    rows, cols = (h - patch) // step + 1, (w - patch) // step + 1
    if rows < 1 or cols < 1:
        raise ConfigError(f"a {w}x{h} px map holds no {patch} px patch")
    inst = inst.astype(np.int64, copy=False)
    area_um2 = np.bincount(inst.ravel()).astype(np.float64) * mpp * mpp
    area_um2[0] = 0.0
    cls = np.zeros(area_um2.shape, np.int64)  # label class of each instance id: 0 background, 1..3 size bin
    cls[1:] = 1 + (area_um2[1:] > bins.low).astype(np.int64) + (area_um2[1:] > bins.high).astype(np.int64)
    cls[area_um2 == 0] = 0
    pix = cls[inst]
    onehot = np.stack([pix == c for c in range(4)], axis=-1).astype(np.float64)
    # per-patch sums from a summed-area table: S[y, x] = sum over [0, y) x [0, x)
    sat = np.zeros((h + 1, w + 1, 4))
    sat[1:, 1:] = onehot.cumsum(0).cumsum(1)
    ys = np.arange(rows) * step
    xs = np.arange(cols) * step
    y0, x0 = ys[:, None], xs[None, :]
    sums = sat[y0 + patch, x0 + patch] - sat[y0, x0 + patch] - sat[y0 + patch, x0] + sat[y0, x0]
    hist: np.ndarray = sums / float(patch * patch)
    if features == "fraction":
        return np.stack([hist[..., 0], hist[..., 1:].sum(-1)], axis=-1)
    if features == "size":
        return hist
    ids = np.unique(inst)
    ids = ids[ids > 0]
    dens = np.zeros((rows, cols))
    if len(ids):
        cyx = np.asarray(ndi.center_of_mass(np.ones_like(inst), inst, ids), dtype=np.float64).reshape(-1, 2)
        for cy, cx in cyx:
            r = (ys <= cy) & (cy < ys + patch)
            c = (xs <= cx) & (cx < xs + patch)
            dens[np.ix_(r, c)] += 1.0
    dens *= bins.median / ((patch * mpp) ** 2)
    return np.concatenate([hist, dens[..., None]], axis=-1)


@dataclass(frozen=True)
class KMeansResult:
    centres: np.ndarray  # (K, F)
    labels: np.ndarray  # (N,)
    inertia: float  # sum of squared distances to the assigned centre


def _sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d: np.ndarray = np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)
    return d


def _kmeans_once(x: np.ndarray, k: int, rng: np.random.Generator, iters: int) -> KMeansResult:
    centres = [x[int(rng.integers(len(x)))]]
    for _ in range(1, k):  # k-means++: next centre with probability proportional to the squared distance
        d = _sqdist(x, np.stack(centres)).min(1)
        total = d.sum()
        j = int(rng.choice(len(x), p=d / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(x[j])
    c = np.stack(centres)
    labels = np.full(len(x), -1)
    for _ in range(iters):
        new = _sqdist(x, c).argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
    d = _sqdist(x, c)
    labels = d.argmin(1)
    return KMeansResult(c, labels, float(d[np.arange(len(x)), labels].sum()))


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 4, iters: int = 100) -> KMeansResult:
    """Seeded k-means (k-means++ seeding, ``restarts`` runs, the lowest inertia kept); clusters are ordered
    by their centre's first feature (background fraction) so that mode ids do not depend on the seed."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < k or k < 1:
        raise ConfigError(f"k-means needs at least K={k} feature vectors, got {len(x)}")
    rng = np.random.default_rng(seed)
    best = min((_kmeans_once(x, k, rng, iters) for _ in range(restarts)), key=lambda r: r.inertia)
    order = np.lexsort(best.centres.T[::-1])
    rank = np.empty(k, np.int64)
    rank[order] = np.arange(k)
    return KMeansResult(best.centres[order], rank[best.labels], best.inertia)


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each row of ``x`` (any leading shape, features last)."""
    flat = x.reshape(-1, x.shape[-1])
    out: np.ndarray = np.asarray(_sqdist(flat, centres).argmin(1)).reshape(x.shape[:-1])
    return out


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) of a clustering; 0 for single-member clusters."""
    d = np.sqrt(_sqdist(x, x))
    ks = np.unique(labels)
    if len(ks) < 2:
        return 0.0
    mean_to = np.stack([d[:, labels == k].mean(1) for k in ks], axis=1)  # (N, K) mean distance to each cluster
    sizes = np.array([(labels == k).sum() for k in ks])
    own = np.searchsorted(ks, labels)
    n_own = sizes[own]
    a = mean_to[np.arange(len(x)), own] * n_own / np.maximum(n_own - 1, 1)  # exclude the point itself
    other = mean_to.copy()
    other[np.arange(len(x)), own] = np.inf
    b = other.min(1)
    s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


@dataclass(frozen=True)
class PatchModes:
    """The K source modes: feature set, patch size, size bins and the k-means centres."""

    features: str
    patch: int
    mpp: float
    bins: SizeBins
    centres: np.ndarray

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def labels(self, inst: np.ndarray) -> np.ndarray:
        """(rows, cols) mode index of each patch of a crop's instance map."""
        return assign(patch_features(inst, self.mpp, self.patch, self.bins, self.features), self.centres)

    def to_dict(self) -> dict[str, object]:
        return {
            "features": self.features,
            "patch_px": self.patch,
            "size_bins_um2": [round(self.bins.low, 3), round(self.bins.high, 3)],
            "median_area_um2": round(self.bins.median, 3),
            "centres": [[round(float(v), 5) for v in row] for row in self.centres],
        }


def source_features(
    maps: Sequence[np.ndarray], mpp: float, patch: int, features: str, bins: SizeBins | None = None
) -> tuple[np.ndarray, SizeBins]:
    """Features of every source patch (half-overlapping grid) of every instance map, and the size bins."""
    bins = bins or SizeBins.from_instances(maps, mpp)
    rows = [
        patch_features(m, mpp, patch, bins, features, step=max(1, patch // 2)).reshape(-1, _width(features))
        for m in maps
        if min(m.shape) >= patch
    ]
    if not rows:
        raise ConfigError(f"no source image is as large as one {patch} px patch")
    return np.concatenate(rows), bins


def _width(features: str) -> int:
    return {"fraction": 2, "size": 4, "size+density": 5}[features]


def fit_modes(maps: Sequence[np.ndarray], mpp: float, patch: int, k: int, features: str, seed: int) -> PatchModes:
    """Cluster the patches of the source instance maps into ``k`` modes."""
    x, bins = source_features(maps, mpp, patch, features)
    res = kmeans(x, k, seed)
    return PatchModes(features=features, patch=patch, mpp=mpp, bins=bins, centres=res.centres)


def k_table(
    maps: Sequence[np.ndarray], mpp: float, patch: int, ks: Sequence[int], seed: int = 0, max_points: int = 2000
) -> list[dict[str, float | int | str]]:
    """Inertia (as the fraction of the total variance left), silhouette and smallest cluster share for each
    feature set and K, on the source patches (a seeded subsample of ``max_points`` for the silhouette)."""
    out: list[dict[str, float | int | str]] = []
    bins = SizeBins.from_instances(maps, mpp)
    for feats in FEATURE_SETS:
        x, _ = source_features(maps, mpp, patch, feats, bins)
        total = float(((x - x.mean(0)) ** 2).sum())
        sub = np.random.default_rng(seed).permutation(len(x))[:max_points]
        for k in ks:
            r = kmeans(x, k, seed)
            share = np.bincount(r.labels, minlength=k).min() / len(x)
            out.append(
                {
                    "features": feats,
                    "k": k,
                    "inertia_left": r.inertia / max(total, 1e-12),
                    "silhouette": silhouette(x[sub], r.labels[sub]),
                    "smallest_share": float(share),
                }
            )
    return out


__all__ = [
    "FEATURE_SETS",
    "KMeansResult",
    "PatchModes",
    "SizeBins",
    "assign",
    "fit_modes",
    "k_table",
    "kmeans",
    "patch_features",
    "silhouette",
    "source_features",
]
