"""Where indexes live, and writing files so that a crash never leaves half of one behind."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .jsonio import dumps
from .errors import GeoindexError

from .layout import EMBEDDINGS, MANIFEST, MARKER, STAGING  # noqa: F401 (MARKER, STAGING: imported from here too)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@=-]{0,127}$")


def index_home(index_dir=None) -> Path:
    """--index-dir, else $GEOINDEX_HOME, else ./indexes. One clear error when it names a file."""
    source = "--index-dir" if index_dir else "GEOINDEX_HOME" if os.environ.get("GEOINDEX_HOME") else None
    home = Path(index_dir or os.environ.get("GEOINDEX_HOME") or "indexes").expanduser()
    if home.exists() and not home.is_dir():
        where = f"{source}={home}" if source else str(home)
        raise GeoindexError(f"{where} is a file, not a folder; point {source or '--index-dir'} at a folder for indexes")
    return home


def check_index_name(name: str) -> str:
    """Index names are names, never paths: no '/', no '..', nothing hidden. Returns the name."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise GeoindexError(f"index name {name!r} is not a plain name: use letters, digits and . _ - + @ = "
                            "(at most 128, not starting with '.', no '/' or '..'); --index-dir chooses the folder")
    return name


def name_from(text: str) -> str:
    """A valid index name made from a folder name (for the default `<data folder>-<backbone>`)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+@=-]+", "_", text).strip("._-")[:100]
    return cleaned or "index"


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; an index is ordinary data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(obj) + "\n")


def fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exchange_dirs(a, b) -> bool:
    """Swap two folders in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    result = renameat2(AT_FDCWD, os.fsencode(os.fspath(a)), AT_FDCWD, os.fsencode(os.fspath(b)), RENAME_EXCHANGE)
    if result != 0:
        import ctypes
        errno = ctypes.get_errno()
        if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot swap
            return False
        raise OSError(errno, os.strerror(errno), os.fspath(a))
    return True


def replace_dir(new, target) -> None:
    """Make `new` appear at `target`; a reader sees the old folder or the new one, never a mix.

    Afterwards the old content (if any) is at `new`, for the caller to delete.
    """
    new, target = Path(new), Path(target)
    if target.exists():
        if not exchange_dirs(new, target):
            # Two renames: a query in the gap between them finds no index (and says so), never half of one.
            aside = new.with_name(new.name + ".old")
            os.rename(target, aside)
            os.rename(new, target)
            os.rename(aside, new)
    else:
        os.rename(new, target)
    fsync_dir(target.parent)


def made_by_geoindex(folder) -> bool:
    """A folder geoindex created: it holds the marker, or (indexes built before the marker) a geoindex manifest."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / MARKER).is_file():
        return True
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return isinstance(manifest, dict) and manifest.get("format") == 1 and "backbone" in manifest \
            and (folder / EMBEDDINGS).is_file()
    except (OSError, ValueError):
        return False


def remove_geoindex_folder(folder, home) -> None:
    """Delete a folder only if it lies directly inside the index home (or its staging area) and geoindex made it."""
    folder, home = Path(folder), Path(home).resolve()
    parent = folder.parent.resolve()
    if parent not in (home, home / STAGING) or folder.is_symlink():
        raise GeoindexError(f"refusing to delete {folder}: it is not a folder inside the index home {home}")
    if not made_by_geoindex(folder) and parent == home:
        raise GeoindexError(f"refusing to delete {folder}: geoindex did not make it (no {MARKER} file)")
    shutil.rmtree(folder)


# ------------------------------------------------------------------ fault injection (the test suite's hook)
_fault_counts: dict[str, int] = {}


def fault_point(phase: str) -> None:
    """GEOINDEX_FAULT=phase:n[:SIGNAL] sends this process SIGKILL (or SIGNAL, e.g. TERM) the n-th time `phase` is reached.

    Costs one environment lookup when unset; lets tests prove that a kill at any phase loses nothing.
    """
    spec = os.environ.get("GEOINDEX_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        wanted, _, rest = item.partition(":")
        count, _, sig = rest.partition(":")
        if wanted == phase:
            _fault_counts[phase] = _fault_counts.get(phase, 0) + 1
            if _fault_counts[phase] == int(count or 1):
                os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))
