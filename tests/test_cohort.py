"""Cohort adaptation (``histoseg adapt-cohort``): patch modes, heads, the adversarial steps, resume, the CLI.

The source set of the end-to-end tests is MoNuSeg reduced to three real training images (a temporary
``HISTOSEG_DATA`` whose files link to the shared data; two are the shipped model's held-out validation
images, so one image trains), which keeps each run to seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from histoseg.cli.main import main
from histoseg.cohort.heads import (
    ModeHead,
    OutputDiscriminator,
    PatchDiscriminator,
    adversarial_loss,
    decoder_features,
    discriminator_step,
    generator_step,
)
from histoseg.cohort.modes import SizeBins, fit_modes, kmeans, patch_features, silhouette
from histoseg.cohort.settings import CohortSettings
from histoseg.errors import ConfigError, HistosegError
from histoseg.models import ModelCard, NetConfig, NucleiNet, load_model, resolve_model

# ------------------------------------------------------------------------------------------------ modes


def _disc_map(side: int, centres: list[tuple[int, int]], radius: float, first: int = 1) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    inst = np.zeros((side, side), np.int32)
    for i, (cy, cx) in enumerate(centres):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = first + i
    return inst


def _kind_patch(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A 32-px patch of one known mode: 0 empty, 1 one large nucleus, 2 many small nuclei."""
    if kind == 0:
        return np.zeros((32, 32), np.int32)
    if kind == 1:
        return _disc_map(32, [(16 + int(rng.integers(-2, 3)), 16 + int(rng.integers(-2, 3)))], 9.0)
    centres = [(y + int(rng.integers(-1, 2)), x + int(rng.integers(-1, 2))) for y in (5, 16, 27) for x in (5, 16, 27)]
    return _disc_map(32, centres, 2.5)


def test_patch_features_of_a_hand_built_patch() -> None:
    """One 10x10 nucleus in a 32-px patch at 1 µm/px: 100/1024 of the pixels, in the size bin its area
    (100 µm²) falls in, and a density of one nucleus times the median area over the patch area."""
    inst = np.zeros((32, 32), np.int32)
    inst[4:14, 4:14] = 1
    bins = SizeBins(low=50.0, high=200.0, median=64.0)
    f = patch_features(inst, 1.0, 32, bins)
    assert f.shape == (1, 1, 5)
    np.testing.assert_allclose(f[0, 0], [924 / 1024, 0.0, 100 / 1024, 0.0, 64 / 1024])
    assert patch_features(inst, 1.0, 16, bins, "fraction").shape == (2, 2, 2)


def test_modes_recover_known_patch_kinds() -> None:
    """Maps tiled from three known patch kinds: the three modes are exactly the three kinds, whatever the seed."""
    rng = np.random.default_rng(3)
    maps, kinds = [], []
    for _ in range(12):
        ks = rng.integers(0, 3, size=(2, 2))
        inst = np.zeros((64, 64), np.int32)
        for r in range(2):
            for c in range(2):
                p = _kind_patch(int(ks[r, c]), rng)
                inst[32 * r : 32 * r + 32, 32 * c : 32 * c + 32] = np.where(p > 0, p + inst.max(), 0)
        maps.append(inst)
        kinds.append(ks)
    for seed in (0, 1):
        modes = fit_modes(maps, 0.5, 32, 3, "size+density", seed)
        got = np.stack([modes.labels(m) for m in maps]).ravel()
        truth = np.stack(kinds).ravel()
        pairs = set(zip(truth.tolist(), got.tolist(), strict=True))
        assert len(pairs) == 3 and len({g for _, g in pairs}) == 3  # a one-to-one map between kinds and modes
        assert modes.labels(np.zeros((32, 32), np.int32))[0, 0] == got[truth == 0][0]


def test_kmeans_is_seeded_and_silhouette_separates() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.05, size=(30, 2)) for c in ((0, 0), (1, 0), (0, 1))])
    a, b = kmeans(x, 3, seed=5), kmeans(x, 3, seed=5)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.centres, b.centres)
    assert len(set(zip(np.repeat([0, 1, 2], 30).tolist(), a.labels.tolist(), strict=True))) == 3
    assert silhouette(x, a.labels) > 0.9
    assert silhouette(x, np.arange(90) % 3) < 0.1  # a clustering that ignores the blobs
    with pytest.raises(ConfigError):
        kmeans(x[:2], 3)


# ------------------------------------------------------------------------------------------------ heads


def _tiny() -> NucleiNet:
    torch.manual_seed(0)
    return NucleiNet(NetConfig(width=8, blocks=(0, 0, 0, 0))).eval()


def test_head_and_discriminator_shapes() -> None:
    net = _tiny()
    x = torch.randn(2, 3, 128, 128)
    with decoder_features(net) as feats:
        out = net(x)
    assert len(feats) == 1 and feats[0].shape == (2, 8, 64, 64)
    logits = ModeHead(8, 5, 32)(feats[0])
    assert logits.shape == (2, 5, 4, 4)
    assert PatchDiscriminator(5)(torch.softmax(logits, 1)).shape == (2, 1, 4, 4)
    space = torch.cat([torch.softmax(out["np"], 1), out["hv"]], 1)
    assert OutputDiscriminator()(space).shape == (2, 1, 8, 8)


def test_generator_step_moves_the_segmenter_and_discriminator_step_moves_the_discriminator() -> None:
    net, head, disc = _tiny(), ModeHead(8, 4, 32), PatchDiscriminator(4)
    gen_params = [*net.parameters(), *head.parameters()]
    opt_g = torch.optim.SGD(gen_params, lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    x_s, x_t = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64) + 1.0
    reps: dict[str, torch.Tensor] = {}

    def loss_fn() -> tuple[torch.Tensor, dict[str, float]]:
        with decoder_features(net) as feats:
            net(x_s)
            net(x_t)
        reps["s"], reps["t"] = torch.softmax(head(feats[0]), 1), torch.softmax(head(feats[1]), 1)
        return adversarial_loss(disc(reps["t"]), True), {}

    def snap(m: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in m.parameters()]

    net0, d0 = snap(net), snap(disc)
    generator_step(opt_g, gen_params, [disc], loss_fn)
    assert all(p.grad is None for p in disc.parameters())
    assert all(torch.equal(a, b) for a, b in zip(d0, snap(disc), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(net0, snap(net), strict=True))
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again
    net1 = snap(net)
    discriminator_step(opt_d, [(disc, reps["s"], reps["t"])])
    assert all(torch.equal(a, b) for a, b in zip(net1, snap(net), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(d0, snap(disc), strict=True))


def test_settings_refuse_bad_values() -> None:
    for kw in ({"method": "pixel"}, {"steps": 0}, {"crop": 100}, {"modes": 1}, {"patch": 48}, {"lr": -1.0},
               {"align_weight": -0.1}, {"align_weight": float("nan")}, {"head_warmup": -1}):
        with pytest.raises(ConfigError):
            CohortSettings(**kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def small_data(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HISTOSEG_DATA with three MoNuSeg training images (links) and the real DSB and CRCHisto folders."""
    root = tmp_path_factory.mktemp("data")
    nuclei = root / "nuclei"
    nuclei.mkdir()
    for name in ("dsb2018-he", "crchisto"):
        (nuclei / name).symlink_to(shared_data / "nuclei" / name)
    held = resolve_model("default").card().training["config"]["val_images"]
    src = shared_data / "nuclei" / "monuseg2018" / "MoNuSegTrainingData"
    others = sorted(p.stem for p in (src / "Annotations").glob("*.xml") if p.stem not in held)
    dst = nuclei / "monuseg2018" / "MoNuSegTrainingData"
    for sub, ext in (("Tissue_Images", ".jpg"), ("Annotations", ".xml")):
        (dst / sub).mkdir(parents=True)
        for stem in [*held, others[0]]:
            (dst / sub / f"{stem}{ext}").symlink_to(src / sub / f"{stem}{ext}")
    return root


def _dsb_images(shared_data: Path, n: int) -> list[str]:
    base = shared_data / "nuclei" / "dsb2018-he" / "stage1_train"
    return [str(d / "images" / f"{d.name}.png") for d in sorted(base.iterdir())[:n]]


def test_cli_adapts_to_two_dsb_images_and_segment_uses_the_model(
    small_data: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HISTOSEG_DATA", str(small_data))
    torch.set_num_threads(1)
    images = _dsb_images(shared_data, 2)
    out = tmp_path / "cohort.safetensors"
    args = ["adapt-cohort", *images, "--slide-mpp", "0.5", "--output", str(out), "--steps", "2", "--crop", "64",
            "--crops-per-slide", "2"]  # fmt: skip
    assert main(args) == 0
    card = ModelCard.load(out.with_suffix(".json"))
    cohort = card.training["cohort"]
    assert cohort["method"] == "patch" and cohort["settings"]["steps"] == 2 and cohort["target_crops"] == 4
    assert [s["name"] for s in cohort["slides"]] == [Path(p).name for p in images]
    assert all(len(s["fingerprint"]["hex"]) == 64 for s in cohort["slides"])
    assert len(cohort["modes"]["centres"]) == 5
    base = resolve_model("default").card()
    assert set(card.source_stats) == set(base.source_stats) and card.source_stats != base.source_stats
    assert (tmp_path / "cohort.work" / "checkpoint.pt").is_file()
    seg = tmp_path / "seg"
    seg_args = ["segment", images[0], "-o", str(seg), "--slide-mpp", "0.5", "--model", str(out), "--formats", "parquet",
                "--no-report", "--tta", "g2p", "--tta-steps", "1", "--tta-regions", "1"]  # fmt: skip
    assert main(seg_args) == 0
    stem = Path(images[0]).stem
    assert (seg / stem / "_SUCCESS").exists()
    prov = json.loads((seg / stem / "provenance.json").read_text())
    assert prov["model"]["name"] == "default-cohort" and prov["model"]["weights"] == str(out)
    assert prov["adaptation"]["method"] == "g2p" and "loss_after" in prov["adaptation"]  # per-slide g2p on top


def test_resume_gives_the_weights_of_an_uninterrupted_run(
    small_data: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histoseg.cohort.data import source_data
    from histoseg.cohort.train import adapt_cohort

    monkeypatch.setenv("HISTOSEG_DATA", str(small_data))
    torch.set_num_threads(1)
    card = resolve_model("default").card()
    src = source_data(card, 64)
    small = [
        replace(s, image=s.image[:128, :128], inst=s.inst[:128, :128])
        for s in src.sources[0].samples
        if s.inst is not None
    ]
    src = replace(src, sources=[replace(src.sources[0], samples=small)])
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    st = CohortSettings(method="patch+output", steps=4, crop=64, checkpoint_every=2, head_warmup=3)
    straight = adapt_cohort(crops, tmp_path / "a.safetensors", settings=st, source=src)

    class Killed(Exception):
        pass

    def kill_at_2(step: int) -> None:
        if step == 2:
            raise Killed

    with pytest.raises(Killed):
        adapt_cohort(crops, tmp_path / "b.safetensors", settings=st, source=src, on_step=kill_at_2)
    assert not (tmp_path / "b.safetensors").exists()
    resumed = adapt_cohort(crops, tmp_path / "b.safetensors", settings=st, source=src)
    net_a, _ = load_model(resolve_model(str(straight)))
    net_b, _ = load_model(resolve_model(str(resumed)))
    net_0, _ = load_model(resolve_model("default"))
    sa, sb, s0 = net_a.state_dict(), net_b.state_dict(), net_0.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], s0[k]) for k in sa)
    other = CohortSettings(method="patch+output", steps=4, crop=64, checkpoint_every=2, head_warmup=3, seed=1)
    with pytest.raises(ConfigError, match="another cohort run"):
        adapt_cohort(crops, tmp_path / "c.safetensors", settings=other, source=src, work=tmp_path / "b.work")


def test_alignment_term_moves_the_target_statistics_toward_the_source(
    small_data: Path, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real DSB crops (a cohort from another lab): the same seeded run with the feature-statistics term ends with
    target statistics closer to the card's source statistics than without it, and the card records the weight."""
    from histoseg.cohort.data import cohort_crops, source_data
    from histoseg.cohort.train import adapt_cohort
    from histoseg.models.inputs import to_input
    from histoseg.tta.g2p import AlignmentLoss

    monkeypatch.setenv("HISTOSEG_DATA", str(small_data))
    torch.set_num_threads(1)
    card = resolve_model("default").card()
    src = source_data(card, 64)
    crops, slides = cohort_crops(_dsb_images(shared_data, 2), slide_mpp=0.5, crops_per_slide=2, crop=64)
    x = to_input(crops, card)
    align = AlignmentLoss(card.source_stats, "z", 2.0)

    def target_loss(path: Path | None) -> float:
        net, _ = load_model(resolve_model(str(path) if path is not None else "default"))
        with torch.no_grad():
            return float(align(net, x)[0])

    losses = {}
    for weight in (0.0, 1.0):
        st = CohortSettings(steps=3, crop=64, align_weight=weight, head_warmup=0)
        out = adapt_cohort(crops, tmp_path / f"w{weight}.safetensors", settings=st, source=src, slides=slides)
        assert ModelCard.load(out.with_suffix(".json")).training["cohort"]["settings"]["align_weight"] == weight
        losses[weight] = target_loss(out)
    before = target_loss(None)
    assert before > 1.0  # DSB lies outside the source slides' range (a source slide costs about 0)
    assert losses[1.0] < losses[0.0] and losses[1.0] < before


def test_head_warmup_teaches_the_mode_head_the_source_modes_first(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real MoNuSeg source crops: the warm-up's loss falls from about ln K (a fresh head at chance), and the card
    records it; without a warm-up nothing is recorded."""
    from histoseg.cohort.data import source_data
    from histoseg.cohort.train import adapt_cohort

    monkeypatch.setenv("HISTOSEG_DATA", str(small_data))
    torch.set_num_threads(1)
    src = source_data(resolve_model("default").card(), 128)
    crops = [np.random.default_rng(i).integers(0, 255, (128, 128, 3), dtype=np.uint8) for i in range(2)]
    st = CohortSettings(steps=1, crop=128, head_warmup=60)
    warm = ModelCard.load(adapt_cohort(crops, tmp_path / "w.safetensors", settings=st, source=src).with_suffix(".json"))
    w = warm.training["cohort"]["head_warmup"]
    assert w["steps"] == 60 and abs(w["loss_first"] - np.log(st.modes)) < 0.4
    assert w["loss_last"] < w["loss_first"] - 0.2, w
    cold = adapt_cohort(crops, tmp_path / "c.safetensors", settings=replace(st, head_warmup=0), source=src)
    assert ModelCard.load(cold.with_suffix(".json")).training["cohort"]["head_warmup"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--output", "x.pt"], "must end in .safetensors"),
        (["--steps", "0"], "steps=0"),
        (["--align-weight", "-1"], "align_weight=-1"),
        (["--method", "pixel"], "invalid choice"),
        (["--device", "cudax"], "must be cpu, cuda or cuda:N"),
        (["--device", "cuda:99"], "no such CUDA device"),
    ],
)
def test_bad_inputs_fail_with_one_line_and_write_nothing(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    images = _dsb_images(shared_data, 1)
    args = ["adapt-cohort", *images, "--slide-mpp", "0.5", "--output", str(tmp_path / "m.safetensors"), *extra]
    if message == "invalid choice":
        with pytest.raises(SystemExit):
            main(args)
    else:
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("histoseg: error:") and message in err and "\n" not in err
    assert not any(tmp_path.iterdir())


def test_missing_slide_and_shipped_output_are_refused(shared_data: Path, tmp_path: Path) -> None:
    from histoseg.cli.cohort import run_adapt_cohort
    from histoseg.cli.main import build_parser

    shipped = resolve_model("default").weights
    for slides, output in (([str(tmp_path / "nope.svs")], str(tmp_path / "m.safetensors")),
                           (_dsb_images(shared_data, 1), str(shipped))):  # fmt: skip
        args = build_parser().parse_args(["adapt-cohort", *slides, "--slide-mpp", "0.5", "--output", output])
        with pytest.raises(HistosegError):
            run_adapt_cohort(args)
    assert not any(tmp_path.iterdir())
