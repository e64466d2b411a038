"""The guard in front of SQLite's WAL index (`<database>-shm`), which SQLite maps into memory.

SQLite reads and writes that file through a shared memory map, not through calls that can fail: if
the file can no longer be written (made immutable with `chattr +i`) or shrinks
under the process (truncated by a careless clean-up), SQLite's next access to a page of the map
faults and the kernel kills the process with SIGBUS. So before every transaction the store asks
this guard, through calls that do fail: a write of no bytes through our own descriptor (refused,
as the map's next write would be) and the file's size (smaller than SQLite has mapped). A refusal
becomes a `StoreError` (a 503, and /readyz not ready) instead of a dead process.

What is left is the instant between the guard's look and SQLite's access: a fault made in that
window still kills the process (see docs/operations.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from service.store.base import StoreError

# The WAL index header: two copies of 48 bytes. Zeroed, it is invalid, and the next transaction
# of any connection rebuilds the whole index from the WAL (as after a crash).
_HEADER = 96


class WalIndexGuard:
    """One per store, opened after SQLite has created the index (its first WAL transaction)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(f"{path}-shm")
        self._fd = os.open(self.path, os.O_RDWR)
        self._size = os.fstat(self._fd).st_size

    def check(self) -> None:
        """StoreError unless the index can be written and has not shrunk."""
        try:
            os.pwrite(self._fd, b"", 0)
        except OSError as exc:
            raise StoreError(f"the WAL index {self.path} cannot be written: {exc.strerror}") from None
        size = os.fstat(self._fd).st_size
        if size < self._size:
            raise StoreError(
                f"the WAL index {self.path} shrank under the process ({size} < {self._size} bytes)"
            )
        self._size = size

    def restore(self) -> bool:
        """Give a shrunk index its size back, zero-filled, with its header invalidated so that SQLite
        rebuilds it from the WAL. Only while no connection is inside a transaction (the caller holds
        the writer and the reader); True when there was something to restore."""
        if os.fstat(self._fd).st_size >= self._size:
            return False
        os.ftruncate(self._fd, self._size)
        os.pwrite(self._fd, bytes(_HEADER), 0)
        return True

    def close(self) -> None:
        os.close(self._fd)
