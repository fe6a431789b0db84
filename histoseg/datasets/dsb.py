"""DSB 2018 (H&E subset) reader: one mask PNG per nucleus merged into an instance map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoseg.datasets.common import Sample, dataset_root, read_mask, read_rgb, relabel, require_dir, rescale
from histoseg.errors import DatasetError


def load_dsb(
    target_mpp: float | None, source_mpp: float = 0.5, root: Path | str | None = None
) -> list[Sample]:
    """Load the DSB 2018 H&E subset (106 images 256x320, one mask PNG per nucleus) as instance maps.

    The dataset gives no magnification (it varies between images); ``source_mpp`` is an explicit
    assumption of the native pixel size (default 0.5 µm/px, i.e. roughly 20x, which matches the typical
    nucleus size in these tiles). RGBA images lose their (opaque) alpha channel. Mask files are labelled
    1..N in sorted file-name order; they do not overlap (a later mask would win).
    """
    base = require_dir(dataset_root(root, "dsb2018-he") / "stage1_train")
    dirs = sorted(p for p in base.iterdir() if p.is_dir())
    if not dirs:
        raise DatasetError(f"no DSB images in {base}")
    out = []
    for d in dirs:
        img_path = d / "images" / f"{d.name}.png"
        if not img_path.is_file():
            raise DatasetError(f"DSB image missing: {img_path}")
        image = read_rgb(img_path)
        inst = np.zeros(image.shape[:2], dtype=np.int32)
        for label, mask_path in enumerate(sorted((d / "masks").glob("*.png")), start=1):
            mask = read_mask(mask_path)
            if mask.shape != inst.shape:
                raise DatasetError(f"{mask_path}: shape {mask.shape} != image {inst.shape}")
            inst[mask] = label
        sample = Sample(name=d.name, image=image, inst=relabel(inst), mpp=source_mpp, source="dsb2018-he")
        out.append(rescale(sample, target_mpp))
    return out
