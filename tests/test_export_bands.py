"""Band-streamed export: the writers fed a slide's nuclei band after band write what one table gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from histoseg.export import (
    GeoJSONWriter,
    LabelZarrWriter,
    ParquetTableWriter,
    write_geojson,
    write_label_zarr,
    write_parquet,
)
from histoseg.export import parquet as parquet_module
from histoseg.types import InstanceTable
from tests.test_export import CHUNK, _make_table


def _in_id_order() -> InstanceTable:
    t = _make_table()
    return t.take(np.argsort(t.ids, kind="stable"))


def _split(table: InstanceTable, cuts: list[int]) -> list[tuple[InstanceTable, int | None]]:
    """``table`` cut at rows ``cuts``; each part with the highest row no later part's masks reach above."""
    edges = [0, *cuts, len(table)]
    parts = [table.take(np.arange(a, b)) for a, b in zip(edges, edges[1:], strict=False)]
    out: list[tuple[InstanceTable, int | None]] = []
    for i, part in enumerate(parts):
        later = [int(p.mask_offsets[:, 0].min()) for p in parts[i + 1 :] if len(p)]
        out.append((part, min(later) if later else None))
    return out


def _zarr_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {f"{name}/{k}": np.asarray(group[f"labels/{name}/{k}"][:]) for name in ("nuclei", "classes") for k in "01"}


@pytest.mark.parametrize("cuts", [[], [3], [1, 2, 6], [0, 8]])
def test_band_writers_equal_one_table(tmp_path: Path, cuts: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parquet_module, "ROW_GROUP", 3)  # several row groups from 8 rows
    table = _in_id_order()
    write_geojson(table, tmp_path / "one.geojson", slide_key="k")
    write_parquet(table, tmp_path / "one.parquet")
    write_label_zarr(table, tmp_path / "one.zarr", image=None, chunk=CHUNK, levels=2)
    with (
        GeoJSONWriter(tmp_path / "bands.geojson", slide_key="k") as gj,
        ParquetTableWriter(tmp_path / "bands.parquet", table) as pw,
        LabelZarrWriter(tmp_path / "bands.zarr", table.plane, image=None, chunk=CHUNK, levels=2) as zw,
    ):
        for part, final_above in _split(table, cuts):
            gj.write(part)
            pw.write(part)
            zw.write(part, final_above)
    assert gj.written == pw.written == len(table) == 8
    assert (tmp_path / "bands.geojson").read_bytes() == (tmp_path / "one.geojson").read_bytes()
    one, bands = pq.ParquetFile(tmp_path / "one.parquet"), pq.ParquetFile(tmp_path / "bands.parquet")
    assert bands.read().to_pandas().equals(one.read().to_pandas())  # NaN measurements compare equal here
    # row groups of a fixed size, whatever the bands: the file does not depend on how the slide was cut
    sizes = [bands.metadata.row_group(i).num_rows for i in range(bands.metadata.num_row_groups)]
    assert sizes == [3, 3, 2]
    assert bands.schema_arrow.metadata == one.schema_arrow.metadata
    a, b = _zarr_arrays(tmp_path / "one.zarr"), _zarr_arrays(tmp_path / "bands.zarr")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert a["nuclei/0"].any()
    one_attrs = zarr.open_group(str(tmp_path / "one.zarr"), mode="r")["labels/classes"].attrs.asdict()
    assert zarr.open_group(str(tmp_path / "bands.zarr"), mode="r")["labels/classes"].attrs.asdict() == one_attrs


def test_label_writer_paints_rows_once_final(tmp_path: Path) -> None:
    """Rows are painted as soon as they are final, and only the nuclei that reach lower rows are kept."""
    table = _in_id_order()
    order = np.argsort(table.mask_offsets[:, 0], kind="stable")
    top, rest = table.take(order[:4]), table.take(order[4:])
    final_above = int(rest.mask_offsets[:, 0].min())
    with LabelZarrWriter(tmp_path / "l.zarr", table.plane, image=None, chunk=CHUNK) as zw:
        zw.write(top, final_above)
        painted = final_above // CHUNK * CHUNK
        assert zw._next_row == final_above // CHUNK  # noqa: SLF001 - the writer's progress is what is tested
        bottoms = zw._pending.mask_offsets[:, 0] + np.array([m.shape[0] for m in zw._pending.masks])  # noqa: SLF001
        assert (bottoms > painted).all()
        with pytest.raises(ValueError, match="reaches above plane row"):
            zw.write(top)  # masks above rows already written: refused, not painted twice
        zw.write(rest)


def test_band_writers_leave_nothing_on_failure(tmp_path: Path) -> None:
    table = _in_id_order()
    with pytest.raises(RuntimeError, match="boom"):
        with (
            GeoJSONWriter(tmp_path / "x.geojson", slide_key="k") as gj,
            ParquetTableWriter(tmp_path / "x.parquet", table) as pw,
            LabelZarrWriter(tmp_path / "x.zarr", table.plane, image=None, chunk=CHUNK) as zw,
        ):
            gj.write(table)
            pw.write(table)
            zw.write(table)
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
