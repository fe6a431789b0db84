"""Ship a trained model into the package: float16 safetensors + card + a human-readable MODEL_CARD.md.

    python -m histoseg.training.ship runs/default/default.safetensors --name default [--evaluate]

With ``--evaluate`` the shipped weights themselves are evaluated on MoNuSeg 2018 test (per image and mean)
and CRCHisto validation, and the figures are written into the card, so the card states what the shipped
file does (the shipped-model test re-checks two of those images).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from histoseg.models import load_model, resolve_model, save_model
from histoseg.models.card import ModelCard
from histoseg.models.registry import WEIGHTS_DIR


def render_card(card: ModelCard, extra: dict[str, Any] | None = None) -> str:
    """Markdown model card from the JSON card."""
    m = card.metrics
    lines = [
        f"# Model card: `{card.name}`",
        "",
        card.description or "HoVer-Net-style multi-task nuclei network (NP + HV heads), plain PyTorch.",
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | NucleiNet, width {card.net.width}, blocks {list(card.net.blocks)}, "
        f"type head: {'yes' if card.net.n_types else 'no (single class Nucleus)'} |",
        f"| processing resolution | {card.mpp} µm/px |",
        f"| input normalisation | RGB/255, mean {list(card.mean)}, std {list(card.std)} |",
        f"| classes | {', '.join(f'{n} {list(c)}' for n, c in zip(card.class_names, card.class_colors, strict=True))}"
        " |",
        f"| receptive-field radius | {card.context_radius_px} px; largest training nucleus {card.max_nucleus_um} µm; "
        f"halo {card.halo_px()} px |",
        f"| post-processing | {json.dumps(card.postprocess)} (tuned on held-out training images) |",
        f"| source feature statistics | {len(card.source_stats)} BatchNorm layers "
        "(input mean/var pooled over the training set, and the mean and spread over training images of each "
        "image's own mean and log-variance, for test-time adaptation) |",
        "",
        "## Training data and licence",
        "",
        "MoNuSeg 2018 training set (Kumar et al., IEEE TMI 2017; 30 H&E 1000x1000 tiles at 40x from TCGA, several "
        "organs): the 13 images whose polygon annotations are available train NP and HV, the 17 others train NP "
        f"from their binary masks; held out for validation: {', '.join(card.training.get('held_out', []))}.",
        "MoNuSeg is licensed **CC BY-NC-SA 4.0**; these weights are derived from it and are distributed under the "
        "same terms: **non-commercial use only, share-alike, attribution to the MoNuSeg authors**.",
        "DSB 2018 and CRCHisto were not used for training (kept as shifted domains for evaluation).",
        "",
        "Recipe: `histoseg train --config configs/default.yaml` (seeded, resumable; AdamW, cosine schedule, "
        "bfloat16 autocast on CPU). " + str(card.training.get("recipe_note", "")),
        "",
        "## Measured",
        "",
    ]
    mt = m.get("monuseg_test", {}).get("mean")
    if mt:
        lines += [
            "MoNuSeg 2018 test (14 images, scored at native resolution; detection radius 3 µm):",
            "",
            "| Dice | AJI | AJI+ | DQ | SQ | PQ | det F1 |",
            "|---|---|---|---|---|---|---|",
            f"| {mt['dice']:.3f} | {mt['aji']:.3f} | {mt['aji_plus']:.3f} | {mt['dq']:.3f} | {mt['sq']:.3f} | "
            f"{mt['pq']:.3f} | {mt['det_f1']:.3f} |",
            "",
        ]
    cv = m.get("crchisto_val", {}).get("mean")
    if cv:
        lines += [f"CRCHisto validation (10 images, never trained on): detection F1 {cv['det_f1']:.3f} "
                  f"(precision {cv['det_precision']:.3f}, recall {cv['det_recall']:.3f}; radius 3.3 µm).", ""]
    for k, v in (extra or {}).items():
        lines += [f"### {k}", "", str(v), ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--name", default="default")
    ap.add_argument("--description", default="")
    ap.add_argument("--evaluate", action="store_true")
    ap.add_argument("--extra-md", default=None, help="markdown file appended to MODEL_CARD.md")
    args = ap.parse_args()
    net, card = load_model(resolve_model(args.weights))
    card = replace(card, name=args.name, description=args.description or card.description)
    target = WEIGHTS_DIR / f"{args.name}.safetensors"
    art = save_model(net, card, target, half=True)
    if args.evaluate:
        from histoseg.training.evaluate import evaluate

        mon = evaluate("monuseg-test", str(art.weights))
        crc = evaluate("crchisto-val", str(art.weights))
        card.metrics = {
            **card.metrics,
            "monuseg_test": {"mean": mon["mean"], "per_image": {r["image"]: r for r in mon["images"]}},
            "crchisto_val": {"mean": crc["mean"]},
        }
        card.save(art.card_path)
    extra = {}
    if args.extra_md:
        extra["Trade-off and notes"] = Path(args.extra_md).read_text()
    (WEIGHTS_DIR / "MODEL_CARD.md").write_text(render_card(card, extra))
    print(f"shipped {art.weights} ({art.weights.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
