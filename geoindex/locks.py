"""One build (or removal) of an index name at a time: an advisory lock that dies with its holder."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import GeoindexError


class IndexBusy(GeoindexError):
    pass


class IndexLock:
    """`<home>/.locks/<name>.lock`, held with flock: the kernel releases it when the holder dies, even by SIGKILL,
    so a stale file never blocks anyone. The file holds the holder's pid, for the refusal message."""

    def __init__(self, home, name: str, action: str = "build"):
        self.path = Path(home) / ".locks" / f"{name}.lock"
        self.name, self.action = name, action
        self.fd: int | None = None

    def acquire(self) -> "IndexLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise IndexBusy(f"index {self.name!r} is busy: another geoindex process (pid {holder}) is building or "
                                "removing it; wait for it to finish or stop it, then rerun") from None
            # The holder before us may have unlinked the file after we opened it: then retry on the new file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing releases the flock
        self.fd = None
        try:
            self.path.parent.rmdir()  # only when no other name is locked
        except OSError:
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
