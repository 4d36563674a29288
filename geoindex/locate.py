"""Finding built indexes by name, without importing torch or FAISS (listing must be instant)."""
from __future__ import annotations

from pathlib import Path

from .errors import IndexNotFound
from .fileio import MARKER, STAGING, index_home
from .layout import MANIFEST


def resolve_index_path(name_or_path, index_dir=None) -> Path:
    candidate = Path(name_or_path).expanduser()
    if (candidate / MANIFEST).is_file():
        return candidate
    path = index_home(index_dir) / str(name_or_path)
    if (path / MANIFEST).is_file():
        return path
    if "/" not in str(name_or_path) and ((path / MARKER).is_file() or (index_home(index_dir) / STAGING / str(name_or_path)).is_dir()):
        raise IndexNotFound(f"index {str(name_or_path)!r} is not finished: a build of it is running or was "
                            "interrupted; rerun that build command to finish it (or `geoindex rm "
                            f"{name_or_path}` to discard it)")
    available = [p.name for p in list_index_paths(index_dir)]
    hint = f"built indexes: {', '.join(available)}" if available else "none is built yet; run `geoindex build`"
    raise IndexNotFound(f"no index named {name_or_path!r} in {where(index_dir)} ({hint})")


def where(index_dir=None) -> str:
    """The index folder, absolute, saying when it came from the current directory (the default ./indexes)."""
    import os
    home = index_home(index_dir)
    if index_dir or os.environ.get("GEOINDEX_HOME"):
        return str(home.resolve())
    return f"{home.resolve()} (./indexes of the current folder; set GEOINDEX_HOME or --index-dir to look elsewhere)"


def list_index_paths(index_dir=None) -> list[Path]:
    home = index_home(index_dir)
    if not home.is_dir():
        return []
    return sorted(p for p in home.iterdir() if (p / MANIFEST).is_file())


def list_indexes(index_dir=None) -> list[dict]:
    """Manifests of the usable indexes; broken or unfinished ones are left out (see integrity.index_entries)."""
    from .integrity import index_entries
    return [e["manifest"] | {"path": e["path"]} for e in index_entries(index_home(index_dir)) if e["status"] == "ok"]


def default_index_name(index_dir=None) -> str:
    """The most recently built index, so `geoindex query photo.jpg` works right after a build."""
    paths = list_index_paths(index_dir)
    if not paths:
        raise IndexNotFound(f"no index in {where(index_dir)}; run `geoindex build` first, or point --index-dir or "
                            "GEOINDEX_HOME at the folder that holds your indexes")
    return max(paths, key=lambda p: (p / MANIFEST).stat().st_mtime).name
