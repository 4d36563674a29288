"""One writer per index name at a time: an advisory lock that dies with its holder.

Every command that writes into an index or replaces it (build, train, bench's outputs, rm, relocate) holds
the index's lock for its whole run, taken before any work, so a second writer is refused at once instead of
after minutes of work, and no write can land in a folder that a concurrent build swapped out. The lock is
re-entrant within one process: `train` holds it while the re-embedding it calls takes it again.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from .errors import GeoindexError, IndexBusy, IndexReplaced  # noqa: F401 (re-exported: raised here first)
from .fileio import fault_point


# Lock file path -> [fd, depth]: flock on a second fd of the same process would refuse its own holder.
_HELD: dict[str, list] = {}
_HELD_GUARD = threading.Lock()


class IndexLock:
    """`<home>/.locks/<name>.lock`, held with flock: the kernel releases it when the holder dies, even by SIGKILL,
    so a stale file never blocks anyone. The file holds the holder's pid and command, for the refusal message."""

    def __init__(self, home, name: str, action: str = "build"):
        self.path = Path(os.path.abspath(Path(home) / ".locks" / f"{name}.lock"))
        self.name, self.action = name, action
        self.fd: int | None = None
        self._nested = False

    def acquire(self) -> "IndexLock":
        key = str(self.path)
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                self._nested = True
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").split()
                    os.close(fd)
                    pid = holder[0] if holder else "unknown"
                    doing = f", `geoindex {holder[1]}`" if len(holder) > 1 else ""
                    raise IndexBusy(f"index {self.name!r} is busy: another geoindex process (pid {pid}{doing}) is "
                                    f"writing to it; nothing was done. Wait for it to finish (or stop it), then rerun "
                                    f"`geoindex {self.action}`") from None
                # The holder before us may have unlinked the file after we opened it: then retry on the new file.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {self.action}\n".encode())
            self.fd = fd
            _HELD[key] = [fd, 1]
        fault_point(f"locked-{self.action}")  # lets the tests hold a writer here (SIGSTOP) and race another
        return self

    def release(self) -> None:
        key = str(self.path)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(held[0])  # closing releases the flock
            self.fd = None
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only when no other name is locked

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def index_lock(folder, action: str) -> IndexLock:
    """The lock of the index at `folder` (`<home>/<name>`)."""
    folder = Path(folder)
    return IndexLock(folder.parent, folder.name, action)


@contextlib.contextmanager
def writing_to(index, action: str):
    """Hold the lock of an open index and check it is still the index on disk: a build that swapped a new one in
    since it was opened would otherwise receive heads trained for, or paths rewritten from, the one it replaced."""
    from .integrity import read_manifest

    with index_lock(index.path, action):
        try:
            on_disk = read_manifest(index.path).get("build_id")
        except GeoindexError:
            on_disk = None
        if on_disk != index.manifest.get("build_id"):
            raise IndexReplaced(f"index {index.name!r} was rebuilt or removed since it was opened (by another "
                                f"process); nothing was written. Rerun `geoindex {action}` to use the index as it "
                                "is now")
        yield
