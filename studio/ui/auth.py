"""Login throttling: Gradio's ``/login`` answers as fast as anyone can ask, so a password could be
guessed at hundreds of tries a second. :class:`LoginThrottle` (an ASGI middleware in front of the
Gradio app) counts failed logins per client address: after ``free`` failures each further one
locks that address out for twice as long as the previous (``base_s``, ``2 * base_s``, ... up to
``max_s``); a locked-out address gets ``429 Too Many Requests`` with the wait in the message and in
``Retry-After``, without its password being checked. A successful login clears the count;
failures are forgotten after ``forget_s`` without one.

Attempts are checked one at a time, so parallel requests cannot slip past the count.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

FREE_FAILURES = int(os.environ.get("STUDIO_LOGIN_FREE_FAILURES", "5"))
BASE_LOCK_S = float(os.environ.get("STUDIO_LOGIN_LOCK_S", "2"))
MAX_LOCK_S = 900.0
FORGET_S = 3600.0


def login_note(free: int = FREE_FAILURES) -> str:
    """The line the login page shows about the lock-out (the page itself only says "Incorrect credentials")."""
    return (f"After {free} wrong passwords, logins from your address pause for a few seconds, and longer after "
            f"each further wrong one (up to {MAX_LOCK_S / 60:.0f} minutes).")


class FailedLogins:
    """Failed-login counts and lock-outs per client address (bounded: the oldest addresses are forgotten)."""

    def __init__(self, free: int = FREE_FAILURES, base_s: float = BASE_LOCK_S, max_s: float = MAX_LOCK_S,
                 forget_s: float = FORGET_S, max_clients: int = 10_000):
        self.free, self.base_s, self.max_s, self.forget_s = max(0, free), base_s, max_s, forget_s
        self.max_clients = max_clients
        self._clients: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait_s(self, client: str, now: float | None = None) -> float:
        """Seconds this client must wait before its next login attempt is checked (0: go ahead)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                return 0.0
            if now - entry["last"] > self.forget_s and now >= entry["until"]:
                del self._clients[client]
                return 0.0
            return max(0.0, entry["until"] - now)

    def failed(self, client: str, now: float | None = None) -> float:
        """Count a failed login; returns the lock-out it starts (0 while failures are still free)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            entry = self._clients.pop(client, None) or {"failures": 0.0, "until": 0.0, "last": now}
            if now - entry["last"] > self.forget_s:
                entry["failures"] = 0.0
            entry["failures"] += 1
            entry["last"] = now
            over = int(entry["failures"]) - self.free
            lock = 0.0 if over < 0 else min(self.max_s, self.base_s * 2 ** over)
            entry["until"] = now + lock
            self._clients[client] = entry
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            return lock

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)

    def __len__(self) -> int:
        return len(self._clients)


def _is_login(scope: Scope) -> bool:
    return scope.get("type") == "http" and scope.get("method") == "POST" and \
        str(scope.get("path") or "").rstrip("/").endswith("/login")


class LoginThrottle:
    """ASGI middleware: back-off and lock-out per client address on ``POST .../login`` (see the module)."""

    def __init__(self, app: ASGIApp, book: FailedLogins | None = None):
        self.app = app
        self.book = book or FailedLogins()
        self._one_at_a_time: asyncio.Lock | None = None

    async def __call__(self, scope: Scope, receive, send) -> None:
        if not _is_login(scope):
            await self.app(scope, receive, send)
            return
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        client = str((scope.get("client") or ("unknown",))[0])
        async with self._one_at_a_time:  # check, answer and count as one step: no parallel slipping through
            wait = self.book.wait_s(client)
            if wait > 0:
                await _too_many(send, wait)
                return
            status: list[int] = []

            async def watch(message: Message) -> None:
                if message.get("type") == "http.response.start":
                    status.append(int(message.get("status", 0)))
                await send(message)

            await self.app(scope, receive, watch)
            if status and status[0] == 400:  # Gradio's "Incorrect credentials"
                self.book.failed(client)
            elif status and status[0] == 200:
                self.book.succeeded(client)


async def _too_many(send, wait: float) -> None:
    seconds = max(1, math.ceil(wait))
    body = json.dumps({"detail": f"Too many failed logins from your address: try again in {seconds} s."}).encode()
    await send({"type": "http.response.start", "status": 429,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", str(seconds).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["FailedLogins", "LoginThrottle", "login_note"]
