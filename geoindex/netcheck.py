"""Is the network there? Asked once, answered within about a second, so offline runs never sit in retries."""
from __future__ import annotations

import functools
import os
import socket
import threading

PROBE_HOST, PROBE_PORT, TIMEOUT_S = "huggingface.co", 443, 1.0


@functools.lru_cache(maxsize=None)
def network_reachable(host: str = PROBE_HOST, port: int = PROBE_PORT, timeout: float = TIMEOUT_S) -> bool:
    """A TCP connect to the weights host, in a thread so a hanging DNS lookup cannot hold us past `timeout`."""
    result = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def offline_reason() -> str | None:
    """Why nothing may be downloaded now, or None when downloads may be tried."""
    for var in ("GEOINDEX_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "0") not in ("", "0", "false"):
            return f"downloads are off ({var}=1)"
    if not network_reachable():
        return f"the network is unreachable (no answer from {PROBE_HOST} within {TIMEOUT_S:g} s)"
    return None
