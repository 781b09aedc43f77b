"""A ``sitecustomize`` for child processes that records every attempt to reach a host off this
machine: the platform must run offline, and a silent download attempt would hang in production.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

NET_GUARD = textwrap.dedent("""
    import os, socket
    _log = os.environ["NET_ATTEMPTS_LOG"]
    def _record(what):
        with open(_log, "a") as f:
            f.write(repr(what) + "\\n")
    _getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect
    def getaddrinfo(host, *a, **k):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            _record(("getaddrinfo", host))
        return _getaddrinfo(host, *a, **k)
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in (
                "127.0.0.1", "::1", "localhost"):
            _record(("connect", address))
        return _connect(self, address)
    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
""")

def net_guard_env(home: Path, root: Path) -> dict[str, str]:
    """``PYTHONPATH`` and ``NET_ATTEMPTS_LOG`` for a child whose network attempts are logged."""
    guard = home / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(NET_GUARD)
    return {"PYTHONPATH": os.pathsep.join([str(guard), str(root)]),
            "NET_ATTEMPTS_LOG": str(home / "net_attempts.log")}
