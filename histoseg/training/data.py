"""Training data for the default model: MoNuSeg 2018 training images at the model's mpp.

Images with instance polygons train NP and HV; images with binary masks only train NP. A few
instance-labelled images are held out for validation (never the MoNuSeg test set, which is kept for the
final evaluation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from histoseg.datasets import Sample, load_monuseg
from histoseg.errors import DatasetError
from histoseg.training.augment import Augmenter, Batch, random_crop_batch
from histoseg.training.config import TrainConfig


@dataclass
class TrainingData:
    train: list[Sample]
    val: list[Sample]
    rng: np.random.Generator
    augmenter: Augmenter
    semantic_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_nucleus_um: float

    @staticmethod
    def monuseg(cfg: TrainConfig) -> TrainingData:
        samples = load_monuseg("train", cfg.mpp)
        inst_names = sorted(s.name for s in samples if s.inst is not None)
        held = list(cfg.val_images) or inst_names[-2:]
        unknown = sorted(set(held) - {s.name for s in samples})
        if unknown:
            raise DatasetError(f"validation images not in MoNuSeg training set: {unknown}")
        train = [s for s in samples if s.name not in held]
        val = [s for s in samples if s.name in held]
        cfg.val_images = held
        pix = np.concatenate([s.image.reshape(-1, 3) for s in train]).astype(np.float64) / 255.0
        mean = tuple(round(float(v), 4) for v in pix.mean(0))
        std = tuple(round(float(v), 4) for v in pix.std(0))
        extent = 0
        for s in samples:
            if s.inst is None:
                continue
            for sl in ndi.find_objects(s.inst):
                if sl is not None:
                    extent = max(extent, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start)
        rng = np.random.default_rng(cfg.seed)
        return TrainingData(
            train=train,
            val=val,
            rng=rng,
            augmenter=Augmenter(rng, cfg.crop),
            semantic_fraction=cfg.semantic_fraction,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            max_nucleus_um=float(np.ceil(extent * cfg.mpp)),
        )

    def batch(self, n: int) -> Batch:
        """``n`` augmented crops; a share ``semantic_fraction`` from semantic-only images."""
        inst_idx = [i for i, s in enumerate(self.train) if s.inst is not None]
        sem_idx = [i for i, s in enumerate(self.train) if s.inst is None]
        idx = []
        for _ in range(n):
            pool = sem_idx if (sem_idx and self.rng.random() < self.semantic_fraction) else inst_idx
            idx.append(pool[int(self.rng.integers(0, len(pool)))])
        return random_crop_batch(self.train, self.augmenter, n, indices=idx)

    def train_images(self) -> Iterator[np.ndarray]:
        for s in self.train:
            yield s.image
