"""An index checks its own files before it answers: sizes always, checksums when a file changed.

The manifest records each file's size and sha256 (and the stat stamp it had when written). Opening
an index compares sizes (free), and hashes a file in full only when asked or when its stamp
(mtime, ctime, inode: ctime cannot be set back by a user) differs from the recorded one. A good
hash is remembered in `.verified.json` (best effort: the folder may be read-only), so a copied
index is hashed once, not on every query.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import IndexCorrupt  # noqa: F401 (re-exported: raised here first)
from .fileio import MARKER, STAGING, write_json_atomic

from .layout import CHECKPOINT, MANIFEST, REEMBED_MARK, TAIL_MODE, VERIFIED, head_dir


def sha256_file(path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def describe_files(folder, names) -> dict:
    """{file: {bytes, sha256, stamp}} for the manifest, computed from the finished files."""
    folder = Path(folder)
    out = {}
    for name in names:
        st = (folder / name).stat()
        out[name] = {"bytes": st.st_size, "sha256": sha256_file(folder / name), "stamp": _stamp(st)}
    return out


def _fix(name: str) -> str:
    return (f"rebuild it (`geoindex build --name {name} --overwrite ...` with the data it was built from) "
            f"or remove it (`geoindex rm {name}`)")


def read_manifest(folder) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise IndexCorrupt(f"index {folder.name!r} has no {MANIFEST} (an unfinished or damaged build); "
                           + _fix(folder.name)) from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"not valid JSON: {exc}"
        raise IndexCorrupt(f"index {folder.name!r}: {path} is unreadable ({reason}); " + _fix(folder.name)) from None
    required = ("name", "backbone", "classes", "counts", "index", "embed_dim")
    if not isinstance(manifest, dict) or any(key not in manifest for key in required):
        raise IndexCorrupt(f"index {folder.name!r}: {path} is not a geoindex manifest (fields missing); "
                           + _fix(folder.name))
    return manifest


def verify_files(folder, manifest: dict, full: bool = False) -> None:
    """Raise IndexCorrupt naming the first file that is missing or differs from the manifest's record."""
    folder = Path(folder)
    records = manifest.get("files")
    if not records:  # indexes built before files were recorded: nothing to compare with
        return
    try:
        verified = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        verified = {}
    newly_verified = {}
    for name, record in records.items():
        path = folder / name
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IndexCorrupt(f"index {folder.name!r}: {name} is missing; " + _fix(folder.name)) from None
        if st.st_size != record["bytes"]:
            raise IndexCorrupt(f"index {folder.name!r}: {name} is {st.st_size} bytes, its manifest says "
                               f"{record['bytes']} (damaged or replaced); " + _fix(folder.name))
        stamp = _stamp(st)
        trusted = stamp == record.get("stamp") or (verified.get(name) == [record["sha256"], *stamp])
        if full or not trusted:
            if sha256_file(path) != record["sha256"]:
                raise IndexCorrupt(f"index {folder.name!r}: {name} differs from the one this index was built with "
                                   "(checksum mismatch: edited, damaged or copied from another index); "
                                   + _fix(folder.name))
            if not trusted:
                newly_verified[name] = [record["sha256"], *stamp]
    if newly_verified:
        try:
            write_json_atomic(folder / VERIFIED, {**verified, **newly_verified})
        except OSError:
            pass  # a read-only index is hashed again next time; still correct


def _running_writer(home: Path, name: str) -> str | None:
    """"pid N (`geoindex CMD`)" while a live process holds the index's lock (geoindex.locks), else None.

    The lock file exists only while held or after its holder was killed; a live pid tells the two apart.
    Nothing is locked here: probing the flock would make a writer starting at that instant refuse."""
    try:
        holder = (home / ".locks" / f"{name}.lock").read_text().split()
        pid = int(holder[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return None
    if pid == os.getpid():
        return None
    return f"pid {pid}" + (f", `geoindex {holder[1]}`" if len(holder) > 1 else "")


def index_entries(home) -> list[dict]:
    """Every index folder in `home`, finished or not: {name, path, status, reason, manifest}.

    status: "ok", "broken" (reason says why and how to fix it) or "unfinished" (a build in progress
    or interrupted: rerun it to finish). One broken index never hides the others.
    """
    home = Path(home)
    entries = {}
    if home.is_dir():
        for folder in sorted(home.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            has_manifest = (folder / MANIFEST).exists()
            if not has_manifest and not (folder / MARKER).is_file():
                continue  # not geoindex's
            try:
                manifest = read_manifest(folder)
                verify_files(folder, manifest)
                entries[folder.name] = {"name": folder.name, "path": str(folder), "status": "ok", "reason": None,
                                        "manifest": manifest}
            except IndexCorrupt as exc:
                entries[folder.name] = {"name": folder.name, "path": str(folder), "status": "broken",
                                        "reason": str(exc), "manifest": None}
        for name, entry in entries.items():
            writer = _running_writer(home, name)
            if writer:
                entry["unfinished"] = f"being changed now by {writer}"
            elif entry["status"] == "ok" and (home / name / head_dir(TAIL_MODE) / CHECKPOINT).is_file():
                entry["unfinished"] = (f"`geoindex train` was interrupted during its tail fine-tuning (the index "
                                       f"answers as before): rerun `geoindex train --index {name}` to resume it, or "
                                       f"`geoindex rm {name} --unfinished` to discard its checkpoint")
        staging = home / STAGING
        if staging.is_dir():
            for folder in sorted(staging.iterdir()):
                if not folder.is_dir():
                    continue
                shards = list((folder / "cache").glob("shard-*.npz"))
                entry = entries.get(folder.name)
                writer = _running_writer(home, folder.name)
                if writer:
                    reason = f"being built or re-embedded now by {writer}; it stays as it is until that finishes"
                elif (folder / REEMBED_MARK).is_file():  # train's re-embedding, not a build
                    reason = (f"`geoindex train` was interrupted while re-embedding it (the index answers as before, "
                              f"with its old embeddings): rerun `geoindex train --index {folder.name}` to finish, or "
                              f"`geoindex rm {folder.name} --unfinished` to discard only the unfinished part")
                elif entry is not None:
                    reason = (f"a rebuild is unfinished: {len(shards)} checkpoint shard(s) kept in {folder}; rerun the "
                              f"build command to finish it, or `geoindex rm {folder.name} --unfinished` to discard only "
                              "the rebuild (`geoindex rm NAME` deletes the index too)")
                else:
                    reason = (f"unfinished build: {len(shards)} checkpoint shard(s) kept in {folder}; rerun the build "
                              f"command to finish it, or `geoindex rm {folder.name}` to discard it")
                if entry is None:
                    entries[folder.name] = {"name": folder.name, "path": str(folder), "status": "unfinished",
                                            "reason": reason, "manifest": None}
                else:
                    entry["unfinished"] = reason
    return [entries[name] for name in sorted(entries)]
