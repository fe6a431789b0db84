"""The card of a network typed on a frozen trunk (:mod:`histoseg.training.typehead`).

The typed card is the trunk's card (same architecture, statistics, thresholds and segmentation figures) with
the context type head, the types and their colours, CRCHisto's licence terms, and how it was made: the trunk's
recipe, then the head's step. A trunk that is itself typed this way (a shipped typed model given a new head,
or the shipped recipe run again on the shipped file) is first brought back to its untyped record: its head's
step, description, type weights and typing figures describe a head that is being replaced, so they are dropped
rather than stacked onto the new ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histoseg.models.card import ModelCard
    from histoseg.training.typehead import TypeHeadConfig

DATA_TEXT = "CRCHisto training set (70 images, nucleus centre points with 4 classes)"
HEAD_STEP = "; then its type head on the frozen trunk, "  # where the head's step starts in a typed recipe
TYPES_TEXT = " Types ("  # where the head's sentence starts in a typed description
HEAD_RECORDS = ("type_head", "type_weights_fit", "recipe")  # training keys that belong to a head
HEAD_METRICS = ("crchisto_typing",)  # figures that belong to a head


def config_json(cfg: TypeHeadConfig) -> dict[str, Any]:
    """The config as recorded in the card."""
    out: dict[str, Any] = json.loads(json.dumps(asdict(cfg)))
    return out


def untyped_record(card: ModelCard) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """The trunk's own description, recipe (without "Recipe: "), training record and metrics: those of ``card``,
    less what a frozen-trunk type head added to them, when it has one. Typing figures and a type-weight fit are
    always left out: they describe a head that is being replaced (a model typed end to end, too)."""
    from histoseg.training.ship import recipe_text

    metrics = {k: v for k, v in card.metrics.items() if k not in HEAD_METRICS}
    if "type_head" not in card.training:
        training = {k: v for k, v in card.training.items() if k != "type_weights_fit"}
        return card.description, recipe_text(card).removeprefix("Recipe: "), training, metrics
    recipe = str(card.training.get("recipe", "")).removeprefix("Recipe: ").removeprefix("Recipe, two steps: ")
    steps = recipe.removeprefix("the trunk, ").split(HEAD_STEP)[0]
    training = {k: v for k, v in card.training.items() if k not in HEAD_RECORDS}
    return card.description.split(TYPES_TEXT)[0], steps, training, metrics


def with_types(cfg: TypeHeadConfig, card: ModelCard) -> ModelCard:
    """The trunk's card for the typed network: the same trunk and NP/HV figures, the context type head, the
    types and their colours, CRCHisto's licence terms added."""
    from histoseg.models.network import receptive_radius
    from histoseg.training.labels import type_colors
    from histoseg.training.train import CRCHISTO_LICENSE

    net_cfg = replace(card.net, n_types=len(cfg.types), type_head="context")
    # the head reads stride-16 features: at some output phases it reaches farther than the trunk (the shipped
    # default: 111 px against 108), and the halo, derived from the card, must cover the larger field
    radius = max(card.context_radius_px, receptive_radius(net_cfg))
    description, steps, training, metrics = untyped_record(card)
    training = {
        **training,
        "type_head": {"config": config_json(cfg), "trunk": card.name, "data": DATA_TEXT},
        "recipe": f"Recipe: the trunk, {steps}{HEAD_STEP}`histoseg train "
        f"--config configs/{cfg.name}-types.yaml` ({cfg.iterations} steps of {cfg.batch_size} image views, "
        f"the held-out images' best kept; training.typehead)",
    }
    license = card.license if CRCHISTO_LICENSE in card.license else card.license + CRCHISTO_LICENSE
    return replace(
        card,
        name=cfg.name,
        net=net_cfg,
        context_radius_px=radius,
        class_names=tuple(cfg.types),
        class_colors=type_colors(cfg.types),
        license=license,
        description=f"{description}{TYPES_TEXT}{', '.join(cfg.types)}): a context type head trained on CRCHisto "
        "training points with this trunk frozen, so the segmentation is the untyped model's.".strip(),
        type_weights=None,
        training=training,
        metrics=metrics,
    )
