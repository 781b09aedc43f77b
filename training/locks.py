"""Advisory file locks that serialize writers on one machine (processes and threads alike).

``flock`` locks belong to an open file description, so two threads of one process that each
open the lock file queue exactly like two processes do. The locks live under the state dir
(``$LEUKOFLOW_HOME/state/locks``); they order work on one host only; what must also hold
across hosts (the curated manifest) is guarded by a conditional write as well.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

__all__ = ["file_lock"]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
