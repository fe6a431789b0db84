"""A slide's output folder: a name that is safe by construction, a lock, and what ``_SUCCESS`` certifies.

* **Name.** ``OUT/<name>/`` where ``<name>`` is the slide's stem made safe (:func:`output_name`): never
  empty, ``.`` or ``..``, no path separator or control character, no leading dot, at most
  ``MAX_NAME_BYTES`` bytes; a name that sanitising empties or shortens gets a hash of the file name.
* **Lock.** One run at a time writes into a slide folder (:class:`FolderLock`, ``fcntl.flock`` on
  ``.histoseg.lock`` inside it); a second run refuses that slide with a one-line error instead of
  mixing its outputs with the first's. The kernel releases the lock when the process exits or is killed.
* **``_SUCCESS``** (JSON) names the slide (path, SHA-256 fingerprint, size, mtime) and the identity of the
  output-affecting settings. A rerun skips a slide only when the slide matches (:func:`finished_report`;
  other settings are reported in the skip message); the same path with new content is segmented again;
  another slide's results are refused with a message naming ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any

import histoseg
from histoseg.config import SegmentConfig
from histoseg.errors import HistosegError, OutputError
from histoseg.export.provenance import SUCCESS_NAME
from histoseg.inference.quantize import CALIBRATION_SUFFIX
from histoseg.inference.runtime import EXPORT_GLOB
from histoseg.models.registry import ADAPTED_SUFFIX
from histoseg.pipeline.identity import settings_hash, slide_fingerprint
from histoseg.pipeline.resume import STORE_DIR

try:  # POSIX; elsewhere runs are not locked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_NAME = ".histoseg.lock"
SUCCESS_FORMAT = 1
MAX_NAME_BYTES = 160  # leaves room for suffixes (".adapted.safetensors") and atomic temporaries under 255
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:]")  # control characters and separators (":" for macOS/Windows)


def slide_stem(path: str | os.PathLike[str]) -> str:
    """The file name without its slide suffix (``.ome.tiff``, ``.ome.zarr``, ``.svs``, ...); may be unsafe."""
    name = Path(path).name
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def output_name(path: str | os.PathLike[str]) -> str:
    """The slide's output folder name (and file-name prefix), safe by construction.

    Separators and control characters become ``_``; leading dots/spaces and trailing dots/spaces are
    stripped. When nothing is left (``..png``, ``.ome.tif``) the name is ``slide-<12 hex of SHA-256 of the
    file name>``; a name longer than ``MAX_NAME_BYTES`` is cut and gets that hash appended, so
    different long names stay different.
    """
    raw = Path(path).name
    digest = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = _UNSAFE.sub("_", slide_stem(path)).lstrip(". ").rstrip(". ")
    if not name:
        return f"slide-{digest}"
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > MAX_NAME_BYTES:
        cut = encoded[: MAX_NAME_BYTES - 13].decode("utf-8", "ignore").rstrip(". ")
        name = f"{cut}-{digest}"
    return name


def check_writable(folder: Path) -> None:
    """Create ``folder`` (and parents) or raise OutputError naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable")


class FolderLock:
    """Exclusive, non-blocking lock of one slide folder for the duration of a ``with`` block.

    Raises OutputError when another run (another process, or another lock object in this one) holds it.
    The lock file holds the owner's pid for the message; the holder deletes it on release (a run killed
    with SIGKILL leaves it, unlocked).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        if fcntl is None:  # pragma: no cover
            return self
        path = self.folder / LOCK_NAME
        while self._fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {path}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                raise OutputError(
                    f"{self.folder} is being written by another histoseg run ({owner or 'unknown process'}); "
                    "wait for it to finish or choose another --output"
                ) from exc
            if _same_file(fd, path):
                self._fd = fd
            else:  # the previous holder removed the file between our open and flock: lock the new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            (self.folder / LOCK_NAME).unlink(missing_ok=True)  # removed while still held (see _same_file)
            os.close(fd)  # closing the last descriptor releases the flock


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a lock file is deleted by its holder on release,
    so a lock taken on a deleted file is void and must be taken again)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def settings_identity(config: SegmentConfig) -> str:
    """SHA-256 of the settings that change a slide's outputs (``SegmentConfig.output_affecting``)."""
    return settings_hash(json.loads(json.dumps(config.output_affecting(), default=str)))


def success_record(path: Path, fingerprint: dict[str, Any], config: SegmentConfig, nuclei: int) -> dict[str, Any]:
    """What ``_SUCCESS`` certifies: these outputs are complete, of this slide, under these settings."""
    st = path.stat()
    return {
        "format": SUCCESS_FORMAT,
        "histoseg_version": histoseg.__version__,
        "slide": {
            "name": path.name,
            "path": str(path.resolve()),
            "fingerprint": fingerprint,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        },
        "settings_sha256": settings_identity(config),
        "nuclei": nuclei,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _recorded(out_dir: Path) -> tuple[dict[str, Any], str | None, int | None] | None:
    """(slide record, settings identity, nuclei) from ``_SUCCESS``, else from ``provenance.json`` (folders
    written before ``_SUCCESS`` was JSON); None when neither says which slide the outputs are of."""
    success = _read_json(out_dir / SUCCESS_NAME)
    prov = _read_json(out_dir / "provenance.json") or {}
    nuclei = prov.get("nuclei")
    nuclei = int(nuclei) if isinstance(nuclei, int) else None
    if success and isinstance(success.get("slide"), dict):
        ident = success.get("settings_sha256")
        return success["slide"], str(ident) if ident else None, nuclei
    if isinstance(prov.get("slide"), dict) and isinstance(prov.get("config"), dict):
        try:
            ident = settings_identity(SegmentConfig(**prov["config"]))
        except (TypeError, ValueError, HistosegError):
            ident = None
        return prov["slide"], ident, nuclei
    return None


def _same_slide(path: Path, slide: dict[str, Any]) -> bool:
    """Whether ``path`` holds the content ``slide`` records: size and mtime equal (a file), else the hash."""
    recorded = slide.get("fingerprint")
    fp: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    if path.is_file():
        st = path.stat()
        if st.st_size == slide.get("size") and st.st_mtime_ns == slide.get("mtime_ns"):
            return True
    return bool(fp) and slide_fingerprint(path).get("hex") == fp.get("hex")


def finished_report(path: Path, out_dir: Path, config: SegmentConfig) -> dict[str, Any] | None:
    """How to treat a folder that has ``_SUCCESS``: None (absent, or the same file changed: redo), or the
    skip details ``{"nuclei": N, "other_settings": bool}``; raises OutputError for another slide's results.

    Results of this slide under other settings are kept (skipped, with a warning), as ``_SUCCESS`` always
    meant; ``--overwrite`` redoes them."""
    if config.overwrite or not (out_dir / SUCCESS_NAME).exists():
        return None
    rec = _recorded(out_dir)
    if rec is None:
        raise OutputError(
            f"{out_dir} has _SUCCESS but does not say which slide it holds; pass --overwrite to redo it "
            "or choose another --output"
        )
    slide, ident, nuclei = rec
    if not _same_slide(path, slide):
        if str(slide.get("path")) == str(path.resolve()):
            log.info("%s changed since %s was written; segmenting it again", path, out_dir)
            return None
        raise OutputError(
            f"{out_dir} holds the results of another slide ({slide.get('path')}) with the same name; "
            "choose another --output, or pass --overwrite to replace them"
        )
    other = ident != settings_identity(config)
    if other:
        log.warning("%s: done under other settings (model or options); kept, pass --overwrite to redo it", out_dir)
    return {"nuclei": nuclei if nuclei is not None else 0, "other_settings": other}


def adapted_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """The per-slide adapted weights and their card (an intermediate, see :func:`remove_intermediates`)."""
    weights = out_dir / f"{name}{ADAPTED_SUFFIX}"
    return weights, weights.with_suffix(".json")


def calibration_path(out_dir: Path, name: str) -> Path:
    """The slide's int8 calibration crops (``pipeline.calibrate``; an intermediate like the adapted weights)."""
    return out_dir / f"{name}{CALIBRATION_SUFFIX}"


def remove_intermediates(out_dir: Path, name: str, config: SegmentConfig) -> None:
    """After ``_SUCCESS``: the adapted weights go unless ``config.keep_adapted`` (their hash is in provenance),
    and with them the graphs an engine exported from them or calibrated on the slide
    (``inference.runtime.export_folder``) and the calibration crops (their digest is in provenance)."""
    if config.keep_adapted:
        return
    weights, card = adapted_paths(out_dir, name)
    for p in (weights, card, calibration_path(out_dir, name), *out_dir.glob(EXPORT_GLOB)):
        p.unlink(missing_ok=True)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` to disk (not the region store, deleted next), so a
    ``_SUCCESS`` that survives a power cut certifies outputs that survived too."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not (Path(root) == folder and d == STORE_DIR)]
        fsync_paths(*(os.path.join(root, name) for name in files), root)


def fsync_paths(*paths: str | os.PathLike[str]) -> None:
    """``fsync`` each file or folder (a folder: its entries); vanished paths are skipped."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError as exc:
            raise OutputError(f"cannot flush {p} to disk: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)
