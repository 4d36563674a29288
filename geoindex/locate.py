"""Finding built indexes by name, without importing torch or FAISS (listing must be instant)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import IndexNotFound
from .fileio import index_home

MANIFEST = "manifest.json"


def resolve_index_path(name_or_path, index_dir=None) -> Path:
    candidate = Path(name_or_path).expanduser()
    if (candidate / MANIFEST).is_file():
        return candidate
    path = index_home(index_dir) / str(name_or_path)
    if (path / MANIFEST).is_file():
        return path
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
    return [json.loads((p / MANIFEST).read_text()) | {"path": str(p)} for p in list_index_paths(index_dir)]


def default_index_name(index_dir=None) -> str:
    """The most recently built index, so `geoindex query photo.jpg` works right after a build."""
    paths = list_index_paths(index_dir)
    if not paths:
        raise IndexNotFound(f"no index in {where(index_dir)}; run `geoindex build` first, or point --index-dir or "
                            "GEOINDEX_HOME at the folder that holds your indexes")
    return max(paths, key=lambda p: (p / MANIFEST).stat().st_mtime).name
