"""Walking a folder for photos without trusting it: symlinks, loops, odd names and look-alike folders.

Every entry that is not returned as a photo is returned with the reason, so a build can list it.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..images import IMAGE_EXTENSIONS
from .records import absolute, file_problem

OUTSIDE = "symlink points outside the data folder ({target}); pass --follow-symlinks to index it"


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def walk_images(folder, root, follow_symlinks: bool = False) -> tuple[list[str], list[dict]]:
    """Photo files under `folder` (recursively, sorted), and skipped entries with reasons.

    Symlinks whose target lies outside `root` are skipped unless follow_symlinks; dangling links,
    loops and folders named like images are skipped with their reason, never silently dropped.
    """
    root_real = os.path.realpath(root)
    photos, skipped, seen_dirs = [], [], set()

    def skip(path, reason):
        skipped.append({"path": absolute(path), "reason": reason})

    def visit(directory: str):
        real = os.path.realpath(directory)
        if real in seen_dirs:
            skip(directory, "symlink loop: this folder was already visited")
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            skip(directory, f"cannot list folder: {exc.strerror or exc}")
            return
        for entry in entries:
            path = entry.path
            is_image_name = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            if entry.is_symlink():
                try:
                    target = os.path.realpath(path, strict=True)
                except (OSError, RuntimeError) as exc:
                    loop = isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == 40
                    skip(path, "symlink loop" if loop else "broken symlink (its target does not exist)")
                    continue
                if not _inside(target, root_real) and not follow_symlinks:
                    skip(path, OUTSIDE.format(target=target))
                    continue
                if os.path.isdir(target):
                    if _inside(target, root_real):
                        skip(path, "symlinked folder inside the data folder: its photos are read at their real place")
                    else:
                        visit(path)
                    continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if is_image_name:
                    skip(path, "a folder, not an image file")
                visit(path)
            elif is_image_name:
                problem = file_problem(path)
                if problem:
                    skip(path, problem)
                else:
                    photos.append(absolute(path))
            elif entry.name not in (".DS_Store", "Thumbs.db", "desktop.ini"):
                skip(path, "not an image file (extension not one of " + ", ".join(IMAGE_EXTENSIONS) + ")")

    visit(os.fspath(folder))
    return photos, skipped


def find_by_stem(root, stems: set[str]) -> dict[str, str]:
    """Map file stems (e.g. OSV-5M ids) to image paths anywhere under root; the first match in sorted order wins."""
    found: dict[str, str] = {}
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and stem in stems and stem not in found:
                found[stem] = absolute(Path(directory) / name)
    return found
