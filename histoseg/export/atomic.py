"""Atomic writes: an output either appears complete under its final name or not at all.

Both helpers build in a hidden sibling of the target (same folder, so the final ``os.replace`` is a
rename on one file system) and clean up after a failure. ``OSError`` raised while creating, writing or
renaming becomes :class:`~histoseg.errors.OutputError`; any other exception propagates unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from histoseg.errors import OutputError

__all__ = ["atomic_dir", "atomic_file"]


def _temp_sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:12]}")


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
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise


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
    try:
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
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
    except BaseException:
        _remove(tmp)
        raise
