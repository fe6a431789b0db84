"""Training data: the datasets of a training config, each with the labels it declares, at the model's mpp.

MoNuSeg 2018 training images are always loaded: a few instance-labelled images are held out for
validation (never the MoNuSeg test set, kept for the final evaluation), and the input normalisation and
largest nucleus come from its training images, so a typed model keeps the normalisation of the untyped
one it may start from. Each batch item is drawn from a dataset with probability proportional to its
``share``, then an image uniformly (MoNuSeg instance labels: a ``semantic_fraction`` of the items come from
its images that only have binary masks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from histoseg.datasets import CRCHISTO_CLASSES, Sample, load_crchisto, load_monuseg
from histoseg.errors import DatasetError
from histoseg.training.augment import STRONG_PHOTOMETRIC, Augmenter
from histoseg.training.config import TrainConfig
from histoseg.training.labels import DatasetSpec


@dataclass
class TrainingSource:
    """One dataset of the config: its samples and the lookup from its class ids to unified types."""

    spec: DatasetSpec
    samples: list[Sample]
    class_lookup: np.ndarray  # dataset class id (0 = none) -> unified type index (-1 = none)

    def instance_types(self, crop: Sample) -> np.ndarray:
        """Unified type per instance id of the crop (index 0 unused): from point classes (an id the dataset
        does not list is "unknown", -1), else unknown."""
        if self.spec.labels == "points":
            n_points = 0 if crop.points is None else len(crop.points)
            if crop.point_classes is None:
                return np.full(n_points + 1, -1, dtype=np.int64)
            cls = np.asarray(crop.point_classes, dtype=np.int64)
            known = (cls >= 0) & (cls < len(self.class_lookup))
            types = np.where(known, self.class_lookup[np.where(known, cls, 0)], -1)
            return np.concatenate([[-1], types]).astype(np.int64)
        n = int(crop.inst.max()) if crop.inst is not None and crop.inst.size else 0
        return np.full(n + 1, -1, dtype=np.int64)


def instance_points(sample: Sample) -> Sample:
    """The sample reduced to its instances' centre points (the point-supervision ablation)."""
    if sample.inst is None:
        raise DatasetError(f"{sample.name}: no instance map to reduce to points")
    ids = np.unique(sample.inst)
    ids = ids[ids > 0]
    cyx = np.asarray(ndi.center_of_mass(np.ones_like(sample.inst), sample.inst, ids), dtype=np.float64)
    pts = cyx[:, ::-1].reshape(-1, 2) if len(ids) else np.zeros((0, 2))
    return Sample(name=sample.name, image=sample.image, points=pts, mpp=sample.mpp, source=sample.source)


@dataclass
class TrainingData:
    sources: list[TrainingSource]
    val: list[Sample]
    rng: np.random.Generator
    augmenter: Augmenter
    semantic_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_nucleus_um: float
    types: tuple[str, ...]
    unlabeled: list[Sample] = field(default_factory=list)  # distill_images: crops learnt from the teacher alone
    strong: Augmenter | None = None  # distill_strong: the student's colour augmentation of those crops

    @staticmethod
    def build(cfg: TrainConfig) -> TrainingData:
        types = tuple(cfg.types)
        specs = [DatasetSpec.from_dict(d, types) for d in cfg.datasets]
        monuseg = load_monuseg("train", cfg.mpp)
        inst_names = sorted(s.name for s in monuseg if s.inst is not None)
        held = list(cfg.val_images) or inst_names[-2:]
        unknown = sorted(set(held) - {s.name for s in monuseg})
        if unknown:
            raise DatasetError(f"validation images not in MoNuSeg training set: {unknown}")
        cfg.val_images = held
        mon_train = [s for s in monuseg if s.name not in held]
        val = [s for s in monuseg if s.name in held]
        sources = []
        crchisto_train: list[Sample] = []  # read once, for a points source and unlabeled crops alike
        for spec in specs:
            if spec.name == "monuseg":
                samples = mon_train
                if spec.labels == "points":
                    samples = [instance_points(s) for s in mon_train if s.inst is not None]
                lut = np.full(1, -1, dtype=np.int64)
            else:
                samples = crchisto_train = crchisto_train or load_crchisto("train", cfg.mpp)
                lut = spec.class_lookup(CRCHISTO_CLASSES, types)
            if not samples:
                raise DatasetError(f"training dataset {spec.name} has no images")
            sources.append(TrainingSource(spec=spec, samples=samples, class_lookup=lut))
        pix = np.concatenate([s.image.reshape(-1, 3) for s in mon_train]).astype(np.float64) / 255.0
        mean = tuple(round(float(v), 4) for v in pix.mean(0))
        std = tuple(round(float(v), 4) for v in pix.std(0))
        extent = 0
        for s in monuseg:
            if s.inst is None:
                continue
            for sl in ndi.find_objects(s.inst):
                if sl is not None:
                    extent = max(extent, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        unlabeled = []
        for name in cfg.distill_images:
            images = mon_train if name == "monuseg" else (crchisto_train or load_crchisto("train", cfg.mpp))
            unlabeled += [Sample(name=s.name, image=s.image, mpp=s.mpp, source=s.source) for s in images]
        rng = np.random.default_rng(cfg.seed)
        strong = Augmenter(rng, cfg.crop, **STRONG_PHOTOMETRIC) if cfg.distill_strong else None  # type: ignore[arg-type]
        return TrainingData(
            sources=sources,
            val=val,
            rng=rng,
            augmenter=Augmenter(rng, cfg.crop),
            semantic_fraction=cfg.semantic_fraction,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            max_nucleus_um=float(np.ceil(extent * cfg.mpp)),
            types=types,
            unlabeled=unlabeled,
            strong=strong,
        )

    def _pick(self, source: TrainingSource) -> int:
        samples = source.samples
        inst_idx = [i for i, s in enumerate(samples) if s.semantic is None]
        sem_idx = [i for i, s in enumerate(samples) if s.semantic is not None]
        pool = sem_idx if (sem_idx and self.rng.random() < self.semantic_fraction) else (inst_idx or sem_idx)
        return pool[int(self.rng.integers(0, len(pool)))]

    def batch(self, n: int) -> list[tuple[Sample, int]]:
        """``n`` augmented crops, each with the index of the source it came from (seeded)."""
        shares = np.array([s.spec.share for s in self.sources], dtype=np.float64)
        shares /= shares.sum()
        out = []
        for _ in range(n):
            k = int(self.rng.choice(len(self.sources), p=shares)) if len(self.sources) > 1 else 0
            src = self.sources[k]
            out.append((self.augmenter(src.samples[self._pick(src)]), k))
        return out

    def distill_batch(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``n`` unlabeled crops as (student image, teacher image), seeded; empty without ``distill_images``.

        Both see the same geometric augmentation. With ``strong``, the teacher sees the crop before any colour
        change and the student after the strong one; otherwise both see the same ordinary augmentation."""
        out = []
        for _ in range(n if self.unlabeled else 0):
            crop = self.augmenter.geometric(self.unlabeled[int(self.rng.integers(0, len(self.unlabeled)))])
            if self.strong is not None:
                out.append((self.strong.photometric(crop.image), crop.image))
            else:
                image = self.augmenter.photometric(crop.image)
                out.append((image, image))
        return out

    def train_images(self) -> Iterator[np.ndarray]:
        """Every training image of every source (for the source feature statistics)."""
        for src in self.sources:
            for s in src.samples:
                yield s.image

    def samples_of(self, k: int) -> Sequence[Sample]:
        return self.sources[k].samples
