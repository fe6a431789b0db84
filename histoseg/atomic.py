"""Atomic writes (layer 0: models, inference, export and the pipeline all write through it): an output either
appears complete under its final name or not at all.

Both helpers build in a hidden sibling of the target (same folder, so the final ``os.replace`` is a
rename on one file system) and clean up after a failure. ``OSError`` raised while creating, writing or
renaming becomes :class:`~histoseg.errors.OutputError`; any other exception propagates unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from histoseg.errors import OutputError

__all__ = ["atomic_dir", "atomic_file", "check_writable_target", "is_temporary_name", "remove_stale_temporaries"]

# the exact names _temp_sibling makes: "." + target name + ".tmp-" or ".old-" + 12 lowercase hex digits
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?:tmp|old)-[0-9a-f]{12}", re.DOTALL)


def _temp_sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}")


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is exactly the name of one of this module's temporaries (``.<target>.tmp-<hex12>``
    or ``.<target>.old-<hex12>``); nothing else a user may keep in a folder matches."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[str]:
    """Delete the temporaries a killed atomic write left directly in ``folder``; return their names.

    Only entries named exactly like :func:`is_temporary_name` are touched (a symlink is unlinked, never
    followed); any other file or folder, hidden or not, is left alone.
    """
    removed: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if is_temporary_name(entry.name):
                _remove(Path(entry.path))
                removed.append(entry.name)
    return sorted(removed)


def _prepare_folder(target: Path) -> None:
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {folder}: {e.strerror or e}") from e
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} is not a directory")


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree; never raise."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _not_writable(target: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {target}: folder {target.parent} is not writable ({e.strerror or e})")


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, target: Path) -> Iterator[None]:
    """Remove the temporary ``tmp`` when the block fails; an ``OSError`` becomes an ``OutputError`` naming
    ``target``, anything else propagates unchanged."""
    try:
        yield
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise


def check_writable_target(path: str | os.PathLike[str]) -> None:
    """Fail early (OutputError) when ``path`` could not be written atomically later: its folder cannot be
    created, or a temporary cannot be made in it. Probes by creating and removing one; ``path`` is untouched.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"cannot write {target}: it is a folder")
    _prepare_folder(target)
    tmp = _temp_sibling(target, "tmp")
    try:
        tmp.touch(exist_ok=False)
    except OSError as e:
        raise _not_writable(target, e) from e
    _remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; ``os.replace`` it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    _prepare_folder(target)
    tmp = _temp_sibling(target, "tmp")
    try:
        tmp.touch(exist_ok=False)  # probe: fails early when the folder is not writable
    except OSError as e:
        raise _not_writable(target, e) from e
    with _removed_on_failure(tmp, target):
        yield tmp
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty hidden temporary folder beside ``path``; rename it to ``path`` on success.

    An existing ``path`` is replaced only once the build succeeded (it is moved aside, the new folder
    renamed in, then the old one deleted). On failure the temporary folder is removed.
    """
    target = Path(path)
    _prepare_folder(target)
    tmp = _temp_sibling(target, "tmp")
    try:
        tmp.mkdir()
    except OSError as e:
        raise _not_writable(target, e) from e
    with _removed_on_failure(tmp, target):
        yield tmp
        old: Path | None = None
        if target.exists() or target.is_symlink():
            old = _temp_sibling(target, "old")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old, target)  # put the previous output back
            raise
        if old is not None:
            _remove(old)
