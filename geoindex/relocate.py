"""Pointing an index at its photos' new place, after the photo folder moved, without embedding anything again."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import GeoindexError
from .fileio import atomic_path, write_json_atomic
from .integrity import describe_files, read_manifest, verify_files
from .layout import EMBEDDINGS, MANIFEST
from .locate import resolve_index_path


def relocate_index(name_or_path, new_root, old_root=None, index_dir=None, log=print) -> dict:
    """Rewrite the photo paths recorded in an index from `old_root` (default: the recorded data root) to
    `new_root`. Refuses when the photos are not at the new place, so a typo cannot break a working index."""
    from .locks import index_lock

    folder = resolve_index_path(name_or_path, index_dir)
    with index_lock(folder, "relocate"):  # the manifest is read under the lock: it is the one rewritten
        return _relocate_locked(folder, new_root, old_root, log)


def _relocate_locked(folder: Path, new_root, old_root, log) -> dict:
    import h5py
    import numpy as np

    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    old_root = os.path.abspath(old_root or manifest.get("data_root") or "")
    new_root = os.path.abspath(os.path.expanduser(new_root))
    if not os.path.isdir(new_root):
        raise GeoindexError(f"{new_root} is not a folder")
    with h5py.File(folder / EMBEDDINGS, "r") as f:
        paths = {s: f[s]["path"].asstr()[...] for s in ("train", "val", "test") if s in f}
    moved = {s: np.array([new_root + p[len(old_root):] if p.startswith(old_root + os.sep) else p for p in ps],
                         dtype=object) for s, ps in paths.items()}
    total = sum(len(p) for p in moved.values())
    changed = sum(int((moved[s] != paths[s]).sum()) for s in paths)
    if changed == 0:
        raise GeoindexError(f"no photo path of index {folder.name!r} starts with {old_root}; give the old folder "
                            "with --from")
    sample = [p for ps in moved.values() for p in ps[:: max(1, len(ps) // 50)]]
    missing = [p for p in sample if not os.path.isfile(p)]
    if len(missing) > len(sample) // 10:
        raise GeoindexError(f"the photos are not at the new place: {len(missing)} of {len(sample)} checked are missing "
                            f"(e.g. {missing[0]}); nothing was changed")
    with atomic_path(folder / EMBEDDINGS) as tmp:
        shutil.copyfile(folder / EMBEDDINGS, tmp)
        with h5py.File(tmp, "r+") as f:
            for split, ps in moved.items():
                f[split]["path"][:] = ps
    manifest["data_root"] = new_root
    if "files" in manifest:
        manifest["files"] = describe_files(folder, list(manifest["files"]))
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    log(f"index {folder.name!r}: {changed} of {total} photo paths now point into {new_root}")
    return {"changed": changed, "total": total, "data_root": new_root}
