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
from histoseg.models.registry import WEIGHTS_DIR, card_markdown_name


def render_card(card: ModelCard, extra: dict[str, Any] | None = None) -> str:
    """Markdown model card from the JSON card."""
    m = card.metrics
    lines = [
        f"# Model card: `{card.name}`",
        "",
        card.description
        or "HoVer-Net-style multi-task nuclei network (NP + HV heads"
        + (", per-class sigmoid type head" if card.net.n_types else "")
        + "), plain PyTorch.",
        "",
        "| field | value |",
        "|---|---|",
        f"| architecture | NucleiNet, width {card.net.width}, blocks {list(card.net.blocks)}, "
        f"{card.net.block} blocks, {card.net.decoder} decoder, {card.net.heads} NP/HV heads, "
        f"type head: {'yes' if card.net.n_types else 'no (single class Nucleus)'} |",
        f"| processing resolution | {card.mpp} µm/px |",
        f"| input normalisation | RGB/255, mean {list(card.mean)}, std {list(card.std)} |",
        f"| classes | {', '.join(f'{n} {list(c)}' for n, c in zip(card.class_names, card.class_colors, strict=True))}"
        " |",
        f"| receptive-field radius | {card.context_radius_px} px; largest training nucleus {card.max_nucleus_um} µm; "
        f"halo {card.halo_px()} px |",
        f"| post-processing | {json.dumps(card.postprocess)} "
        + (
            f"(the teacher's, `{card.training['config']['teacher']}`) |"
            if card.training.get("config", {}).get("thresholds") == "teacher"
            else "(tuned on held-out training images) |"
        ),
        *_type_weight_lines(card),
        f"| source feature statistics | {len(card.source_stats)} BatchNorm layers "
        "(input mean/var pooled over the training set, and the mean and spread over training images of each "
        "image's own mean and log-variance, for test-time adaptation) |",
        "",
        "## Training data and licence",
        "",
        f"{card.training.get('data', 'MoNuSeg 2018 training set')}; held out for validation: "
        f"{', '.join(card.training.get('held_out', []))}.{_type_head_data(card)}",
        "",
        f"Licence: {card.license}",
        "DSB 2018, CRCHisto validation and the MoNuSeg test images were never trained on (kept for evaluation).",
        "",
        *_label_space_lines(card),
        recipe_text(card)
        + " (seeded, resumable; AdamW, cosine schedule, bfloat16 autocast where native). "
        + str(card.training.get("recipe_note", "")),
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
        lines += [
            f"CRCHisto validation (10 images, never trained on): detection F1 {cv['det_f1']:.3f} "
            f"(precision {cv['det_precision']:.3f}, recall {cv['det_recall']:.3f}; radius 3.3 µm).",
            "",
        ]
    ty = m.get("crchisto_typing")
    if ty:
        names = list(ty["per_class_f1"])
        lines += [
            "CRCHisto validation, types (Sirinukunwattana et al. 2016 protocol: centroids matched within 3.3 µm, "
            "classes scored on the detected nuclei; weighted F1 weights each class by its true nuclei):",
            "",
            "| detection F1 | weighted class F1 | " + " | ".join(f"F1 {n}" for n in names) + " |",
            "|---|---|" + "---|" * len(names),
            f"| {ty['det_f1']:.3f} | {ty['weighted_f1']:.3f} | "
            + " | ".join(f"{ty['per_class_f1'][n]:.3f}" for n in names)
            + " |",
            "",
        ]
    for k, v in (extra or {}).items():
        lines += [f"### {k}", "", str(v).rstrip(), ""]
    return "\n".join(lines) + "\n"


def _type_weight_lines(card: ModelCard) -> list[str]:
    """The type decision rule's per-class weights, when the card has them."""
    if not card.type_weights:
        return []
    fit = card.training.get("type_weights_fit", {})
    w = ", ".join(f"{n} x{v:g}" for n, v in zip(card.class_names, card.type_weights, strict=True))
    how = f"fitted on {fit['data']}, " if fit.get("data") else ""
    gain = ""
    if "weighted_f1_plain" in fit:
        gain = f"; weighted class F1 there {fit['weighted_f1_plain']:.3f} -> {fit['weighted_f1_fitted']:.3f}"
    return [
        f"| type decision | highest mean probability over the nucleus after per-class weights: {w} "
        f"({how}`python -m histoseg.training.typecal`{gain}) |"
    ]


def _type_head_data(card: ModelCard) -> str:
    """The data of a type head trained on the frozen trunk (training.typehead), when the card has one."""
    head = card.training.get("type_head")
    if not head:
        return ""
    held = len(head.get("held_out", []))
    return f" Type head (trunk frozen): {head.get('data')}; {held} of its images held out to choose the step."


def recipe_text(card: ModelCard) -> str:
    """How the model was trained, from the training configuration its card records."""
    if card.training.get("recipe"):  # a model trained in several steps states them itself
        return str(card.training["recipe"])
    cfg = card.training.get("config", {})
    name = card.name
    it = cfg.get("iterations", "?")
    if card.net.n_types:
        return (
            "Recipe: `histoseg train --config configs/default.yaml` (untyped, MoNuSeg), "
            f"then `histoseg train --config configs/{name}.yaml` (types, {it} iterations)"
        )
    teacher = cfg.get("teacher")
    how = f"{it} iterations of batch {cfg.get('batch_size', '?')}"
    if teacher:
        how += f", distilled from the `{teacher}` model's NP/HV maps, weight {cfg.get('distill_weight')}"
        if cfg.get("distill_images"):
            how += (
                f", also on {cfg.get('distill_crops')} unlabeled crops per batch of the "
                f"{' and '.join(cfg['distill_images'])} training images"
            )
            if cfg.get("distill_strong"):
                how += " (teacher on the clean crop, student under strong colour augmentation)"
    return f"Recipe: `histoseg train --config configs/{name}.yaml` ({how})"


def _label_space_lines(card: ModelCard) -> list[str]:
    """The unified label space and how each training dataset maps into it (typed models)."""
    if not card.net.n_types:
        return []
    cfg = card.training.get("config", {})
    lines = [
        f"Unified label space (one sigmoid per type, UniSeg): {', '.join(card.class_names)}. Per dataset:",
        "",
    ]
    for d in cfg.get("datasets", []):
        classes = d.get("classes") or {}
        mapping = ", ".join(f"{k} -> {v}" for k, v in classes.items()) or "no types (nucleus only)"
        lines.append(
            f"- {d.get('name')}: {d.get('labels')}"
            + (f" ({d.get('propagation')} propagation)" if d.get("labels") == "points" else "")
            + (f", share {d['share']}" if d.get("share") is not None else "")
            + f"; classes: {mapping}"
        )
    head = card.training.get("type_head", {}).get("config")
    if head:  # a type head trained on the frozen trunk (training.typehead): its own data and class mapping
        mapping = ", ".join(f"{k} -> {v}" for k, v in head.get("classes", {}).items())
        lines.append(f"- crchisto: classified points, the type head only (trunk frozen); classes: {mapping}")
    rel = card.training.get("relations")
    if rel:
        lines += ["", f"Stage-2 class relations (mean type probabilities per dataset label): {json.dumps(rel)}"]
    return [*lines, ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights")
    ap.add_argument("--name", default="default")
    ap.add_argument("--description", default="")
    ap.add_argument("--evaluate", action="store_true")
    ap.add_argument("--extra-md", default=None, help="markdown file appended to MODEL_CARD.md")
    ap.add_argument(
        "--card-only",
        action="store_true",
        help="keep the shipped weights file as it is: re-evaluate (with --evaluate) and re-render its card only "
        "(after a card-only change such as typecal's type weights)",
    )
    args = ap.parse_args()
    source = resolve_model(args.weights)
    net, card = load_model(source)
    card = replace(card, name=args.name, description=args.description or card.description)
    target = WEIGHTS_DIR / f"{args.name}.safetensors"
    if args.card_only:
        if source.weights.resolve() != target.resolve():
            ap.error(f"--card-only re-renders a shipped model's own card: give {target}, not {source.weights}")
        art = source
        card.save(art.card_path)
    else:
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
        if card.net.n_types:
            from histoseg.training.evaluate import score_typing

            shipped, _ = load_model(art)
            card.metrics["crchisto_typing"] = score_typing(shipped, card)
        card.save(art.card_path)
    extra = {}
    if args.extra_md:
        extra["Trade-off and notes"] = Path(args.extra_md).read_text()
    (WEIGHTS_DIR / card_markdown_name(args.name)).write_text(render_card(card, extra))
    print(f"shipped {art.weights} ({art.weights.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
