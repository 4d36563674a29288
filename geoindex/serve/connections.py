"""What a client that never finishes its request may hold: bounded connections, deadlines, and quiet logs.

uvicorn gives an HTTP/1.1 connection no deadline until its first request's headers are complete, and
accepts connections until the process runs out of file descriptors; after that every accept() fails
and is logged with a traceback, and no client, however well-behaved, gets in. GuardedH11Protocol
(uvicorn's own h11 protocol, passed as `http=`) adds:

* a cap on open connections, below the descriptor limit: when it is reached, the connection that has
  waited longest without sending complete headers is closed to make room (a slow client loses its
  place, a normal one gets in); if none is waiting, the newcomer is closed;
* a header deadline: a request's headers must be complete header_timeout seconds after the connection
  opened (or after its previous answer);
* body deadlines: a request body that sends nothing for body_timeout seconds is dropped, and so is one
  still arriving after body_timeout seconds at under MIN_BODY_BYTES_PER_S on average (a trickle of a
  byte now and then would otherwise hold its connection, and its share of --max-inflight-mb, for ever).

RateLimitFilter lets one warning of a kind through per interval and counts the rest, so a flood
(accept() failing, connections dropped) cannot fill the disk with the same message.
"""
from __future__ import annotations

import logging
import os
import resource
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import ServeConfig

SWEEP_S = 0.5
MIN_BODY_BYTES_PER_S = 16 * 1024  # a 20 MB photo in 21 minutes: slower than any real uplink


def _soft_descriptor_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def default_max_connections() -> int:
    """Half the soft descriptor limit, at most 1024: the other half is for the index, the model, thread pools, logs,
    and the sockets accepted in a burst (listen_backlog() at a time, a few bursts deep) before the cap closes them."""
    return max(8, min(1024, _soft_descriptor_limit() // 2))


def listen_backlog() -> int:
    """Connections the kernel queues, and asyncio accepts in one go: small enough that a burst of them cannot use up
    the descriptors the cap leaves free."""
    return max(8, min(2048, _soft_descriptor_limit() // 16))


class GuardedH11Protocol(H11Protocol):
    max_connections: int | None = None  # None: default_max_connections(), read when the first connection comes
    header_timeout: float = ServeConfig.header_timeout
    body_timeout: float = ServeConfig.body_timeout
    _sweeping: set = set()  # event loops with a sweep scheduled

    @classmethod
    def configure(cls, max_connections: int | None = None, header_timeout: float = ServeConfig.header_timeout,
                  body_timeout: float = ServeConfig.body_timeout) -> None:
        cls.max_connections, cls.header_timeout, cls.body_timeout = max_connections, header_timeout, body_timeout

    @classmethod
    def configure_from_env(cls) -> None:
        """In `--workers N` processes, which uvicorn starts afresh: the options come in the environment."""
        raw = os.environ.get("GEOINDEX_SERVE_CONNECTIONS")
        if raw:
            import json
            cls.configure(**json.loads(raw))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        now = time.monotonic()
        self.waiting_since, self.last_data = now, now
        self.body_started, self.body_bytes = None, 0
        loop = self.loop
        if loop not in self._sweeping:
            self._sweeping.add(loop)
            loop.call_later(SWEEP_S, _sweep, loop, self.connections)
        cap = self.max_connections or default_max_connections()
        type(self).max_connections = cap
        # Connections closed a moment ago stay in the set until the loop calls connection_lost: they do not count.
        open_now = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_now) > cap:
            waiting = [c for c in open_now if c is not self and c._waiting_for_headers()]
            victim = min(waiting, key=lambda c: c.waiting_since, default=self)
            victim.transport.abort()
            if victim is not self:
                _log.warning(f"closed the connection waiting longest for its headers: the connection cap ({cap}, "
                             "--max-connections) was reached")
            else:
                _log.warning(f"refused a connection: {cap} are open (--max-connections) and all are busy")

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        in_body = self.conn.their_state is h11.SEND_BODY
        super().data_received(data)
        if in_body:
            self.body_bytes += len(data)
        elif self.conn.their_state is h11.SEND_BODY:
            self.body_started, self.body_bytes = self.last_data, 0

    def on_response_complete(self) -> None:
        self.waiting_since = time.monotonic()  # the next request's headers have their own deadline
        self.body_started = None
        super().on_response_complete()

    def _waiting_for_headers(self) -> bool:
        """Nothing in progress: before the first request's headers are complete, or idle after an answer (h11 stays
        DONE until the next request's first bytes)."""
        return (self.conn.their_state in (h11.IDLE, h11.DONE)
                and (self.cycle is None or self.cycle.response_complete))

    def _overdue(self, now: float) -> str | None:
        if self._waiting_for_headers() and now - self.waiting_since > self.header_timeout:
            return "headers"
        if self.conn.their_state is h11.SEND_BODY:
            if now - self.last_data > self.body_timeout:
                return "body"
            started = self.body_started if self.body_started is not None else self.waiting_since
            if now - started > self.body_timeout and self.body_bytes / (now - started) < MIN_BODY_BYTES_PER_S:
                return "body"
        return None


def _sweep(loop, connections) -> None:
    now = time.monotonic()
    for connection in list(connections):
        why = connection._overdue(now) if isinstance(connection, GuardedH11Protocol) else None
        if why is not None and not connection.transport.is_closing():
            connection.transport.abort()  # connection_lost tells an app still reading the body that the client is gone
            option = "--header-timeout" if why == "headers" else "--body-timeout"
            _log.warning(f"closed a connection whose {why} did not arrive in time ({option})")
    if not loop.is_closed():
        loop.call_later(SWEEP_S, _sweep, loop, connections)


# Warnings about dropped connections come in floods by nature: RateLimitFilter (installed by log_config) keeps one
# line of each kind per interval, so each message is logged as its own template.
_log = logging.getLogger("geoindex.serve")


class RateLimitFilter(logging.Filter):
    """At most one record per (logger, message template) every `interval` seconds; the next one let through says
    how many were dropped, and drops the traceback of a repeat."""

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self.interval = interval
        self.last: dict[tuple, float] = {}
        self.dropped: dict[tuple, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True  # info lines are one per request at most; only warnings and errors come in floods
        key = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self.last.get(key, -1e9) < self.interval:
            self.dropped[key] = self.dropped.get(key, 0) + 1
            return False
        dropped = self.dropped.pop(key, 0)
        if dropped:
            record.msg = f"{record.msg} (and {dropped} more like it in the last {self.interval:g} s)"
            record.exc_info, record.exc_text = None, None  # the first one of the kind showed it
        self.last[key] = now
        return True


def log_config(log_level: str) -> dict:
    """uvicorn's logging, plus the service's own logger and asyncio's (accept() failures), all rate-limited."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"rate_limit": {"()": "geoindex.serve.connections.RateLimitFilter"}}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("rate_limit")
    config["loggers"]["geoindex.serve"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    config["loggers"]["asyncio"] = {"handlers": ["default"], "level": "WARNING", "propagate": False}
    return config
