"""Tests of ``histoseg.models``: the network's outputs, the model card, the safetensors registry (the receptive
field: ``test_receptive_field.py``).

Every expected number here is derived independently of the code under test; the halo by the formula of design
section 4.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from histoseg.errors import ModelError
from histoseg.models import (
    ModelCard,
    NetConfig,
    NucleiNet,
    load_model,
    registered_models,
    resolve_model,
    save_model,
)
from histoseg.models.network import STRIDE

from .nets import SMALL, random_net

# ---------------------------------------------------------------------------------------------------
# helpers


def _card(net: NetConfig = SMALL, **kw: Any) -> ModelCard:
    base: dict[str, Any] = {
        "name": "unit-test",
        "net": net,
        "mpp": 0.5,
        "context_radius_px": 108,
        "max_nucleus_um": 20.0,
    }
    base.update(kw)
    return ModelCard(**base)


def _rich_card() -> ModelCard:
    """A card where every field differs from its default."""
    return ModelCard(
        name="rich",
        net=NetConfig(width=8, blocks=(1, 2, 1, 1), n_types=2),
        mpp=0.25,
        mean=(0.7, 0.5, 0.6),
        std=(0.2, 0.21, 0.22),
        class_names=("Tumour", "Lymphocyte"),
        class_colors=((255, 0, 0), (0, 128, 255)),
        context_radius_px=124,
        max_nucleus_um=18.5,
        training={"dataset": "synthetic", "epochs": 3},
        license="CC0-1.0",
        metrics={"dice": 0.81, "aji": 0.6},
        postprocess={"np_threshold": 0.45},
        source_stats={"stem.1": {"mean": [0.1, -0.2], "var": [1.5, 0.25]}},
        description="every field set",
    )


# ---------------------------------------------------------------------------------------------------
# network


@pytest.mark.parametrize("type_head", ["stride2", "context"])
def test_type_logits_on_the_head_grid_are_the_upsampled_ones(type_head: str) -> None:
    """``native_types``: the TP logits on the head's own grid (what inference keeps, ``models.typemap``); the
    training output is exactly their nearest upsampling to every pixel, and NP and HV do not change."""
    from histoseg.models.typemap import TypeMap

    cfg = NetConfig(width=8, n_types=3, type_head=type_head)
    net = random_net(cfg, dtype=torch.float32)
    h, w = 3 * STRIDE, 5 * STRIDE
    x = torch.rand(1, 3, h, w)
    with torch.no_grad():
        full, native = net(x), net(x, native_types=True)
    s = cfg.type_stride
    assert s == {"stride2": 2, "context": 4}[type_head] and native["tp"].shape == (1, 3, h // s, w // s)
    assert torch.equal(full["np"], native["np"]) and torch.equal(full["hv"], native["hv"])
    cells = TypeMap(native["tp"][0].numpy(), s)
    assert np.array_equal(cells.full(h, w), full["tp"][0].numpy())
    ys, xs = np.array([0, h - 1, 17]), np.array([w - 1, 0, 33])
    assert np.array_equal(cells.take(ys, xs), full["tp"][0].numpy()[:, ys, xs])


@pytest.mark.parametrize("n_types", [0, 3])
def test_output_shapes_and_ranges(n_types: int) -> None:
    cfg = NetConfig(width=8, n_types=n_types)
    net = random_net(cfg, dtype=torch.float32)
    # make the HV pre-activations huge so that the bound is reached: without the tanh they would be >> 1
    with torch.no_grad():
        net.hv_head.out.weight.mul_(1000.0)
    h, w = 3 * STRIDE, 5 * STRIDE
    x = torch.rand(2, 3, h, w)
    with torch.no_grad():
        out = net(x)
    expected_keys = {"np", "hv", "tp"} if n_types else {"np", "hv"}
    assert set(out) == expected_keys
    assert out["np"].shape == (2, 2, h, w)
    assert out["hv"].shape == (2, 2, h, w)
    if n_types:
        assert out["tp"].shape == (2, n_types, h, w)
    hv = out["hv"]
    assert torch.isfinite(hv).all()
    assert float(hv.abs().max()) <= 1.0
    assert float(hv.abs().max()) > 0.99  # the bound was actually exercised
    assert bool((hv > 0.5).any()) and bool((hv < -0.5).any())  # both signs are produced
    # np is logits, not probabilities: a random net produces values outside [0, 1]
    assert float(out["np"].max() - out["np"].min()) > 1.0


# ---------------------------------------------------------------------------------------------------
# model card


def test_card_round_trip_dict_json_and_file(tmp_path: Path) -> None:
    card = _rich_card()
    d = card.to_dict()
    assert d["format"] == 1
    assert d["architecture"] == {"type": "NucleiNet", "width": 8, "blocks": [1, 2, 1, 1], "n_types": 2}
    assert d["classes"] == [
        {"id": 1, "name": "Tumour", "color": [255, 0, 0]},
        {"id": 2, "name": "Lymphocyte", "color": [0, 128, 255]},
    ]
    assert ModelCard.from_dict(d) == card
    assert ModelCard.from_dict(json.loads(json.dumps(d))) == card
    card.save(tmp_path / "c.json")
    assert ModelCard.load(tmp_path / "c.json") == card
    # classes are identified by id, not by list position
    shuffled = copy.deepcopy(d)
    shuffled["classes"].reverse()
    assert ModelCard.from_dict(shuffled) == card


@pytest.mark.parametrize(
    ("context", "max_um", "mpp", "expected"),
    [
        # need = 108 + ceil(20 / 0.5) = 148 -> ceil(148 / 16) * 16 = 10 * 16 = 160
        (108, 20.0, 0.5, 160),
        # need = 108 + ceil(20 / 0.25) = 188 -> 12 * 16 = 192
        (108, 20.0, 0.25, 192),
        # need = 24 + ceil(4 / 0.5) = 32, already a multiple of 16: no extra rounding
        (24, 4.0, 0.5, 32),
        # need = 0 + ceil(10 / 0.3) = ceil(33.33) = 34 -> 3 * 16 = 48
        (0, 10.0, 0.3, 48),
    ],
)
def test_halo_px_worked_examples(context: int, max_um: float, mpp: float, expected: int) -> None:
    card = _card(context_radius_px=context, max_nucleus_um=max_um, mpp=mpp)
    assert card.halo_px() == expected
    need = context + math.ceil(max_um / mpp)
    assert card.halo_px() % STRIDE == 0 and need <= card.halo_px() < need + STRIDE


def _mutations() -> list[Any]:
    def drop(key: str) -> Any:
        return lambda d: d.pop(key)

    def setv(key: str, value: Any) -> Any:
        return lambda d: d.__setitem__(key, value)

    return [
        pytest.param(drop("mpp"), id="no-mpp"),
        pytest.param(drop("name"), id="no-name"),
        pytest.param(drop("architecture"), id="no-architecture"),
        pytest.param(drop("classes"), id="no-classes"),
        pytest.param(drop("input"), id="no-input"),
        pytest.param(drop("context_radius_px"), id="no-context"),
        pytest.param(setv("mpp", "fast"), id="mpp-not-a-number"),
        pytest.param(setv("classes", 3), id="classes-not-a-list"),
        pytest.param(lambda d: d["classes"][0].pop("color"), id="class-without-color"),
        pytest.param(lambda d: d["architecture"].__setitem__("width", "wide"), id="width-not-int"),
        pytest.param(lambda d: d["input"].__setitem__("mean", None), id="mean-null"),
    ]


@pytest.mark.parametrize("mutate", _mutations())
def test_malformed_card_raises_model_error(mutate: Any, tmp_path: Path) -> None:
    d = _card().to_dict()
    mutate(d)
    with pytest.raises(ModelError, match="malformed model card"):
        ModelCard.from_dict(d)
    # the same through a file
    (tmp_path / "c.json").write_text(json.dumps(d))
    with pytest.raises(ModelError):
        ModelCard.load(tmp_path / "c.json")


def test_card_that_is_not_an_object_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        ModelCard.from_dict([1, 2, 3])  # type: ignore[arg-type]
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelCard.load(tmp_path / "bad.json")
    with pytest.raises(ModelError, match="not found"):
        ModelCard.load(tmp_path / "missing.json")


@pytest.mark.parametrize("mpp", [0.0, -0.5])
def test_card_with_non_positive_mpp_is_malformed(mpp: float) -> None:
    d = _card().to_dict()
    d["mpp"] = mpp
    with pytest.raises(ModelError):
        ModelCard.from_dict(d)


def test_card_with_wrong_number_of_stages_is_malformed(tmp_path: Path) -> None:
    art = save_model(random_net(SMALL, dtype=torch.float32), _card(), tmp_path / "m.safetensors")
    d = json.loads(art.card_path.read_text())
    d["architecture"]["blocks"] = [1, 1, 1]
    art.card_path.write_text(json.dumps(d))
    with pytest.raises(ModelError):
        load_model(resolve_model(str(art.weights)))


# ---------------------------------------------------------------------------------------------------
# registry: save / resolve / load


def test_save_resolve_load_round_trip(tmp_path: Path) -> None:
    cfg = NetConfig(width=8, n_types=2)
    net = random_net(cfg, seed=3, dtype=torch.float32)
    card = _rich_card()
    card.net = cfg
    x = torch.rand(2, 3, 4 * STRIDE, 3 * STRIDE)
    with torch.no_grad():
        before = net(x)

    art = save_model(net, card, tmp_path / "sub" / "mine.safetensors")
    assert art.weights == (tmp_path / "sub" / "mine.safetensors").resolve()
    assert art.card_path == (tmp_path / "sub" / "mine.json").resolve()
    assert art.name == "mine"
    assert art.sha256() == hashlib.sha256(art.weights.read_bytes()).hexdigest()

    for spec in (str(art.weights), str(art.card_path)):  # the weights path or the card path
        assert resolve_model(spec) == art

    net2, card2 = load_model(resolve_model(str(art.weights)))
    assert card2 == card
    assert not net2.training
    with torch.no_grad():
        after = net2(x)
    assert set(after) == set(before) == {"np", "hv", "tp"}
    for k in before:
        assert torch.equal(before[k], after[k]), k

    # negative control: a fresh network of the same architecture gives different outputs, so the
    # equality above really depends on the saved parameters and BatchNorm buffers
    with torch.no_grad():
        fresh = NucleiNet(cfg).eval()(x)
    assert not torch.equal(fresh["np"], before["np"])


def test_resolve_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no-such-model-xyz") as exc:
        resolve_model("no-such-model-xyz")
    assert "registered" in str(exc.value)
    for name in registered_models():  # every registered name resolves
        assert resolve_model(name).weights.exists()


def test_resolve_missing_weights_or_card(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "absent.safetensors"))
    art = save_model(random_net(SMALL, dtype=torch.float32), _card(), tmp_path / "m.safetensors")
    art.card_path.unlink()
    with pytest.raises(ModelError, match="model card not found"):
        resolve_model(str(art.weights))


@pytest.mark.parametrize("corruption", ["empty", "truncated", "garbage", "header-only"])
def test_corrupted_weights_raise_model_error(corruption: str, tmp_path: Path) -> None:
    art = save_model(random_net(SMALL, dtype=torch.float32), _card(), tmp_path / "m.safetensors")
    raw = art.weights.read_bytes()
    data = {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "garbage": bytes(range(256)) * 8,
        "header-only": raw[:100],
    }[corruption]
    art.weights.write_bytes(data)
    resolved = resolve_model(str(art.weights))  # resolving only checks that the files exist
    with pytest.raises(ModelError, match="cannot read weights"):
        load_model(resolved)


def test_weights_of_another_width_raise_model_error(tmp_path: Path) -> None:
    art = save_model(random_net(SMALL, dtype=torch.float32), _card(), tmp_path / "m.safetensors")
    _card(net=NetConfig(width=16)).save(art.card_path)
    with pytest.raises(ModelError):
        load_model(resolve_model(str(art.weights)))


def test_a_type_head_needs_one_card_class_per_type(tmp_path: Path) -> None:
    art = save_model(random_net(SMALL, dtype=torch.float32), _card(), tmp_path / "m.safetensors")
    _card(net=NetConfig(width=8, n_types=3)).save(art.card_path)  # 3 types, 1 class
    with pytest.raises(ModelError, match="n_types is 3 but the card lists 1 classes"):
        load_model(resolve_model(str(art.weights)))


def test_weights_without_the_type_head_raise_model_error(tmp_path: Path) -> None:
    art = save_model(random_net(SMALL, dtype=torch.float32), _card(), tmp_path / "m.safetensors")
    typed = _card(net=NetConfig(width=8, n_types=3), class_names=("A", "B", "C"), class_colors=((1, 2, 3),) * 3)
    typed.save(art.card_path)
    with pytest.raises(ModelError, match="do not match"):
        load_model(resolve_model(str(art.weights)))


class _MarkerPayload:
    """Unpickling this object opens (creates) ``path``: a stand-in for arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.path, "w")


def _write_payload(kind: str, marker: Path, dest: Path) -> None:
    if kind == "pickle":
        dest.write_bytes(pickle.dumps({"stem.0.weight": _MarkerPayload(marker)}))
    else:
        torch.save({"stem.0.weight": _MarkerPayload(marker)}, dest)


def _unpickle_unsafely(kind: str, path: Path) -> None:
    if kind == "pickle":
        obj = pickle.loads(path.read_bytes())
    else:
        obj = torch.load(path, weights_only=False)
    obj["stem.0.weight"].close()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_renamed_safetensors_is_rejected_not_executed(kind: str, tmp_path: Path) -> None:
    # control: the payload is live, an unpickling loader would create the marker
    control_marker = tmp_path / "control-marker"
    _write_payload(kind, control_marker, tmp_path / "control.bin")
    _unpickle_unsafely(kind, tmp_path / "control.bin")
    assert control_marker.exists()

    marker = tmp_path / "marker"
    weights = tmp_path / "evil.safetensors"
    _write_payload(kind, marker, weights)
    _card().save(weights.with_suffix(".json"))
    art = resolve_model(str(weights))
    with pytest.raises(ModelError):
        load_model(art)
    assert not marker.exists()


def test_saved_artifacts_are_byte_identical_across_processes(tmp_path: Path) -> None:
    """The artifact's hash identifies adapted weights for resuming: it must not depend on the writing process."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from histoseg.models import ModelCard, NetConfig, NucleiNet, save_model\n"
        "torch.manual_seed(0)\n"
        "net = NucleiNet(NetConfig(width=8))\n"
        "save_model(net, ModelCard(name='x', net=net.cfg, mpp=0.5), sys.argv[1])\n"
    )
    files = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, capture_output=True)
    data = [f.read_bytes() for f in files]
    assert data[0] == data[1] == data[2]


def test_a_typed_card_numbers_its_classes_one_to_n() -> None:
    """Type channel k is class k + 1: a typed card with a gap in its class ids is refused."""
    d = _rich_card().to_dict()
    assert ModelCard.from_dict(d).class_names == ("Tumour", "Lymphocyte")
    d["classes"][1]["id"] = 3
    with pytest.raises(ModelError, match="ids 1..n"):
        ModelCard.from_dict(d)


# ---------------------------------------------------------------------------------------------------
# cheaper architectures (issue: CPU speed)

LITE = NetConfig(width=8, blocks=(1, 2, 2, 2), block="bottleneck", decoder="bottleneck", heads="shared")


def test_cheaper_architecture_switches_build_and_predict() -> None:
    net = random_net(LITE, dtype=torch.float32)
    assert net.head is not None and net.np_head is None and net.hv_head is None
    x = torch.rand(1, 3, 2 * STRIDE, 3 * STRIDE)
    with torch.no_grad():
        out = net(x)
    assert out["np"].shape == out["hv"].shape == (1, 2, 2 * STRIDE, 3 * STRIDE)
    assert float(out["hv"].abs().max()) <= 1.0
    # the shared trunk's channels 0-1 are the NP logits and 2-3 the HV pre-activations
    seen: list[torch.Tensor] = []
    net.head.register_forward_hook(lambda _m, _i, y: seen.append(y))
    with torch.no_grad():
        out = net(x)
    (y,) = seen
    assert y.shape[1] == 4
    assert torch.equal(out["np"], y[:, :2]) and torch.equal(out["hv"], torch.tanh(y[:, 2:]))
    blocks = [m for m in net.modules() if type(m).__name__ == "BottleneckBlock"]
    assert len(blocks) == 7  # 1 + 2 + 2 + 2


@pytest.mark.parametrize(("key", "value"), [("block", "dense"), ("decoder", "unet"), ("heads", "one")])
def test_unknown_architecture_switch_is_rejected(key: str, value: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=key):
        NetConfig(**{key: value})  # type: ignore[arg-type]
    d = _card().to_dict()
    d["architecture"][key] = value
    with pytest.raises(ModelError, match=key):
        ModelCard.from_dict(d)


def test_architecture_switches_round_trip_and_old_cards_keep_their_bytes() -> None:
    lite = _card(net=LITE)
    d = lite.to_dict()
    assert d["architecture"] == {
        "type": "NucleiNet",
        "width": 8,
        "blocks": [1, 2, 2, 2],
        "n_types": 0,
        "block": "bottleneck",
        "decoder": "bottleneck",
        "heads": "shared",
    }
    assert ModelCard.from_dict(json.loads(json.dumps(d))).net == LITE
    # a card written before the switches existed reads as the original architecture, and writes the same record
    old = _card().to_dict()
    assert old["architecture"] == {"type": "NucleiNet", "width": 8, "blocks": [1, 1, 1, 1], "n_types": 0}
    assert ModelCard.from_dict(old).net == NetConfig(width=8, block="basic", decoder="plain", heads="separate")


def test_the_cheaper_network_needs_at_most_half_the_macs() -> None:
    """Counted by forward hooks on every convolution (benchmarks/limit.py), at the shipped width 32."""
    from benchmarks.limit import count_macs

    base = sum(count_macs(NucleiNet(NetConfig()), 256).values())
    lite = sum(count_macs(NucleiNet(NetConfig.from_dict({**LITE.to_dict(), "width": 32})), 256).values())
    assert lite / base <= 0.5
    assert base / (256 * 256) == pytest.approx(52.9e3, rel=0.01)  # the figure benchmarks/limit.py prints


def test_numpy_input_is_bit_identical_to_the_torch_normalisation_for_every_colour() -> None:
    """Exported engines get ``input_array`` (numpy, no torch in the worker); PyTorch gets ``to_input``. Both must
    equal the training path's ``normalise(rgb / 255)`` to the last bit, for all 2^24 RGB colours, with the
    channels-last strides PyTorch's convolutions were measured with."""
    import numpy as np

    from histoseg.models.inputs import input_array, normalise, to_input

    card = resolve_model("default").card()
    v = np.arange(256, dtype=np.uint8)
    for r in range(0, 256, 64):  # 64 red values at a time: 64 x 65536 colours
        rgb = np.stack(np.meshgrid(v[r : r + 64], v, v, indexing="ij"), -1).reshape(1024, 4096, 3)
        ref = normalise(torch.from_numpy(rgb[None]).permute(0, 3, 1, 2).float().div_(255.0), card)
        got = input_array(rgb, card)
        assert got.dtype == np.float32 and got.shape == (1, 3, 1024, 4096)
        assert np.array_equal(got.view(np.uint32), ref.numpy().view(np.uint32))
        t = to_input(rgb, card)
        assert t.stride() == ref.stride() and torch.equal(t, ref)
