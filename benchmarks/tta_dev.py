"""Development benchmark of per-slide adaptation on real shifts: per-image wins and losses against ``none``.

    python benchmarks/tta_dev.py [--methods none,bn,tent,g2p,g2p-top] [--per-set 14]
                                 [--dsb-limit 20] [--gate 0] [--json out.json] [--shard i/n]

Each image is one slide: K seeded crops of it (at the model's resolution) adapt the model, then the whole
image is segmented. Sets (all real images; the MoNuSeg variants are transformations of the real test tiles):
  monuseg-test     MoNuSeg 2018 test, in-domain (PQ);
  monuseg-20as40   the tiles at 20x (halved) read as 40x: the model sees nuclei at half their trained size;
  monuseg-40as20   a 500² px window at 40x read as 20x: nuclei at twice their size;
  monuseg-jpeg     re-scanned look: resampled at 0.6 and back, then JPEG quality 25;
  monuseg-stain    other stain vectors: H and E optical-density vectors turned by a seeded 10-25 degrees;
  dsb              DSB 2018 H&E subset (other labs and scanners; PQ);
  crchisto-val     CRCHisto validation (colorectal, 20x; per-image detection F1, points).
Every adapted model is segmented without the plausibility guard, and what the guard looks at is recorded (the
census ratios, the stain contrast of added and removed nuclei, the mirror-view agreement of source and adapted
model, the shift score), so one run gives each method with and without
the shipped gate and guard (``+guard``, ``TTASettings``' rule; ``tta_guard_sweep.py`` tries others);
``g2p-top+guard`` is the shipped default (``--tta auto``). Images are taken round-robin
over the sets and the JSON is rewritten after every image, so a run cut short still covers every set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from histoseg.datasets import Sample
from histoseg.metrics import centroids, evaluate_instances, match_points
from histoseg.models import load_model, resolve_model
from histoseg.training.evaluate import RADIUS_UM, load_dataset, model_grid, predict_native
from histoseg.tta import TTASettings, adapt
from histoseg.tta import guard as plausibility

try:  # python -m benchmarks.tta_dev
    from benchmarks.tta import crops_of
except ModuleNotFoundError:  # python benchmarks/tta_dev.py: this folder is sys.path[0]
    from tta import crops_of  # type: ignore[no-redef]

_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED = _HED / np.linalg.norm(_HED, axis=1, keepdims=True)

# benchmark method name -> settings (the guard is applied afterwards from the recorded census)
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"method": "none"},
    "bn": {"method": "bn"},
    "tent": {"method": "tent"},
    "g2p": {"method": "g2p", "params": "all"},
    "g2p-top": {"method": "g2p", "params": "top"},
    "g2p-bn": {"method": "g2p", "params": "bn"},
}


def _rotate(v: np.ndarray, axis: np.ndarray, deg: float) -> np.ndarray:
    """``v`` turned by ``deg`` about ``axis`` (Rodrigues), renormalised."""
    k = axis / np.linalg.norm(axis)
    t = np.deg2rad(deg)
    out = v * np.cos(t) + np.cross(k, v) * np.sin(t) + k * (k @ v) * (1 - np.cos(t))
    return np.abs(out) / np.linalg.norm(out)


def restain(image: np.ndarray, seed: int) -> np.ndarray:
    """The image re-rendered with other H and E optical-density vectors (concentrations kept)."""
    rng = np.random.default_rng(seed)
    od = -np.log(np.maximum(image[..., :3].astype(np.float64), 1.0) / 255.0)
    conc = od.reshape(-1, 3) @ np.linalg.inv(_HED)
    new = _HED.copy()
    for i in (0, 1):
        new[i] = _rotate(_HED[i], rng.normal(size=3), rng.uniform(10, 25))
    out = np.exp(-(np.clip(conc, 0, None) @ new)).reshape(image.shape[:2] + (3,)) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def rescan_jpeg(image: np.ndarray, quality: int = 25) -> np.ndarray:
    h, w = image.shape[:2]
    small = cv2.resize(image, (round(w * 0.6), round(h * 0.6)), interpolation=cv2.INTER_AREA)
    back = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", back[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if decoded is None:
        raise RuntimeError("JPEG decoding failed")
    return np.ascontiguousarray(decoded[..., ::-1])


def build_sets(per_set: int, dsb_limit: int) -> dict[str, list[tuple[Sample, float]]]:
    """Set name -> [(sample as the model is told it is, true mpp of its arrays)]."""
    mon = load_dataset("monuseg-test")
    sub = mon[:: max(1, len(mon) // per_set)][:per_set] if per_set < len(mon) else mon
    sets: dict[str, list[tuple[Sample, float]]] = {"monuseg-test": [(s, s.mpp) for s in mon]}
    half = []
    for s in sub:
        h, w = s.image.shape[:2]
        img = cv2.resize(s.image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        inst = cv2.resize(s.inst, (w // 2, h // 2), interpolation=cv2.INTER_NEAREST)  # type: ignore[arg-type]
        half.append((Sample(name=s.name, image=img, inst=inst, mpp=s.mpp, source=s.source), 2 * s.mpp))
    sets["monuseg-20as40"] = half
    win = []
    for s in sub:
        y, x = (s.image.shape[0] - 500) // 2, (s.image.shape[1] - 500) // 2
        img, inst = s.image[y : y + 500, x : x + 500], s.inst[y : y + 500, x : x + 500]  # type: ignore[index]
        win.append((Sample(name=s.name, image=img, inst=inst, mpp=2 * s.mpp, source=s.source), s.mpp))
    sets["monuseg-40as20"] = win
    sets["monuseg-jpeg"] = [(Sample(name=s.name, image=rescan_jpeg(s.image), inst=s.inst, mpp=s.mpp,
                                    source=s.source), s.mpp) for s in sub]
    sets["monuseg-stain"] = [(Sample(name=s.name, image=restain(s.image, 7000 + i), inst=s.inst, mpp=s.mpp,
                                     source=s.source), s.mpp) for i, s in enumerate(sub)]
    sets["dsb"] = [(s, s.mpp) for s in load_dataset("dsb")[:dsb_limit]]
    sets["crchisto-val"] = [(s, s.mpp) for s in load_dataset("crchisto-val")]
    return sets


def score(set_name: str, s: Sample, true_mpp: float, pred: np.ndarray) -> float:
    """PQ for instance sets, per-image detection F1 for CRCHisto."""
    if s.inst is not None:
        return float(evaluate_instances(s.inst, pred, true_mpp, RADIUS_UM.get(set_name, 3.0))["pq"])
    if s.points is None:
        raise ValueError(f"{s.name}: neither instances nor points to score against")
    m = match_points(s.points, centroids(pred), RADIUS_UM["crchisto-val"] / true_mpp)
    return 2 * m.tp / max(1, 2 * m.tp + m.fp + m.fn)


def run_image(set_name: str, idx: int, s: Sample, true_mpp: float, net: Any, card: Any, methods: list[str],
              base: TTASettings) -> dict[str, Any]:
    """Every method on one image: score without and with the plausibility guard, census ratios, timings."""
    img_m = model_grid(s, card)
    crops = crops_of(img_m, base.regions, base.crop, seed=idx)
    none = score(set_name, s, true_mpp, predict_native(net, card, s))
    src_maps = plausibility.segment_crops(net, card, crops)
    src_census = plausibility.census_of(src_maps)
    va_source = plausibility.view_agreement(net, card, crops)
    row: dict[str, Any] = {"set": set_name, "image": s.name, "none": none, "methods": {}}
    for m in methods:
        if m == "none":
            continue
        st = TTASettings(**{**base.__dict__, **VARIANTS[m], "guard": False})
        t0 = time.perf_counter()
        res = adapt(net, card, crops, st)
        secs = time.perf_counter() - t0
        rec: dict[str, Any] = {"seconds": round(secs, 2), "kept": res.state is None,
                               "guard": res.report.get("guard", "")}
        if res.state is None:
            rec.update(score=none, count_ratio=1.0, area_ratio=1.0)
        else:
            use = type(net)(card.net)
            use.load_state_dict(res.state)
            use.eval()
            maps = plausibility.segment_crops(use, card, crops)
            c, a = plausibility.ratios(src_census, plausibility.census_of(maps))
            rec.update(score=score(set_name, s, true_mpp, predict_native(use, card, s)), count_ratio=c, area_ratio=a,
                       changed=plausibility.changed_nuclei(src_maps, maps, crops), src_count=src_census.count,
                       view_agreement=[va_source, plausibility.view_agreement(use, card, crops)],
                       report={k: v for k, v in res.report.items() if isinstance(v, (int, float, str))})
        row["methods"][m] = rec
    return row


def passes(rec: dict[str, Any], rule: TTASettings) -> bool:
    """Whether an adaptation recorded by :func:`run_image` passes the gate and the guard of ``rule`` (its shift
    gate, count and area bounds, stain-contrast thresholds and mirror-view gain), judged as ``histoseg.tta``
    judges it, from the record. The gate is judged from the recorded shift score (records made with
    ``--gate 0`` adapt every image)."""
    if rec["kept"]:
        return False
    shift = rec.get("report", {}).get("shift_score")
    if isinstance(shift, (int, float)) and shift <= rule.gate:
        return False
    (clo, chi), (alo, ahi) = rule.count_bounds, rule.area_bounds
    if not (clo <= rec["count_ratio"] <= chi and alo <= rec["area_ratio"] <= ahi):
        return False
    if plausibility.unlike_nuclei(rec.get("changed", {}), rule.min_added_contrast, rule.max_removed_contrast):
        return False
    if rule.min_view_gain is None:
        return True
    if "view_agreement" not in rec:
        raise ValueError("the record has no mirror-view agreement (made before it was recorded): rerun tta_dev.py")
    return not plausibility.less_consistent(*rec["view_agreement"], rule.min_view_gain)


def method_of(rule: TTASettings) -> str:
    """The benchmark method whose records ``rule`` (g2p) judges: the one moving its ``params`` layers."""
    return {"all": "g2p", "top": "g2p-top", "bn": "g2p-bn"}[rule.params]


def summarise(rows: list[dict[str, Any]], rule: TTASettings) -> str:
    """Per method (raw and +guard, the guard of ``rule``): mean per set, mean change, wins / losses (>0.005),
    worst per-image change."""
    order = list(VARIANTS)  # methods of older records (since removed) come last
    methods = sorted({m for r in rows for m in r["methods"]}, key=lambda m: (m not in order, order.index(m)
                                                                              if m in order else 0, m))
    sets = list(dict.fromkeys(r["set"] for r in rows))
    lines = ["method           " + "".join(f"{s[:14]:>15}" for s in sets) + "   mean-d  wins loss  >0.02  worst"]
    lines.append("none             " + "".join(
        f"{np.mean([r['none'] for r in rows if r['set'] == s]):>15.4f}" for s in sets))
    for m in methods:
        for g in (False, True):
            vals = [(r, r["methods"][m]["score"] if not g or passes(r["methods"][m], rule) else r["none"])
                    for r in rows if m in r["methods"]]
            d = np.array([v - r["none"] for r, v in vals])
            per_set = "".join(f"{np.mean([v for r, v in vals if r['set'] == s]):>15.4f}" for s in sets)
            lines.append(f"{m + ('+guard' if g else ''):<17}{per_set}   {d.mean():+.4f} {int((d > 0.005).sum()):>5} "
                         f"{int((d < -0.005).sum()):>4} {int((d < -0.02).sum()):>6}  {d.min():+.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--methods", default="none,bn,tent,g2p,g2p-top")
    ap.add_argument("--per-set", type=int, default=14, help="MoNuSeg test tiles per transformed set")
    ap.add_argument("--dsb-limit", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--gate", type=float, default=None,
                    help="shift gate of every method (0: adapt every image, so that tta_guard_sweep.py can sweep it)")
    ap.add_argument("--shard", default="0/1", help="i/n: run every n-th image from the i-th (parallel processes)")
    ap.add_argument("--summary", default=None, help="only print the summary of earlier --json files (comma-separated)")
    args = ap.parse_args()
    if args.summary:
        rows_in = [r for f in args.summary.split(",") for r in json.loads(Path(f).read_text())["rows"]]
        print(summarise(rows_in, TTASettings()))
        return
    shard, shards = (int(v) for v in args.shard.split("/"))
    torch.set_num_threads(1)
    net, card = load_model(resolve_model(args.model))
    net.float().eval()
    sets = build_sets(args.per_set, args.dsb_limit)
    order = [(name, i) for i in range(max(len(v) for v in sets.values())) for name, v in sets.items() if i < len(v)]
    order = order[shard::shards]
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for name, i in order:
        s, true_mpp = sets[name][i]
        base = TTASettings() if args.gate is None else TTASettings(gate=args.gate)
        row = run_image(name, i, s, true_mpp, net, card, args.methods.split(","), base)
        rows.append(row)
        print(f"{time.perf_counter() - t_start:7.0f}s {name:<15} {s.name[:24]:<24} none {row['none']:.3f} " + " ".join(
            f"{m} {r['score'] - row['none']:+.3f}{'k' if r['kept'] else ''}(c{r['count_ratio']:.2f}"
            + (f" z{r['changed']['z_added']:.2f}/{r['changed']['z_removed']:.2f})" if "changed" in r else ")")
            for m, r in row["methods"].items()), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(summarise(rows, TTASettings()))


if __name__ == "__main__":
    main()
