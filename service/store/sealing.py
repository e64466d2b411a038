"""AES-256-GCM for secrets at rest (raw tokens), under a current data key and older fallbacks.

The associated data binds a sealed blob to its row (a token's hash), so a blob copied onto another
row fails to open instead of probing with the wrong key.

Keys rotate: the current key seals, and older keys listed as fallbacks still open what they sealed
until `leak-responder rewrap` has resealed it under the current one. Each sealed value is stored
beside its key id (the first 16 hex digits of the key's SHA-256: it names a key without revealing
it), so the store can say which rows a key holds, and opening needs no guessing. Values sealed
before key ids existed have none; they are opened by trying each key.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE = 12


class SealingError(Exception):
    """A sealed value could not be opened: no configured key is the one that sealed it, or the row
    was tampered with. Never carries the value."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


class Sealer:
    def __init__(self, key: bytes, fallbacks: Sequence[bytes] = ()) -> None:
        self._keys = {key_id(k): AESGCM(k) for k in (key, *fallbacks)}
        self.current = key_id(key)

    @property
    def key_ids(self) -> list[str]:
        """The current key's id first, then the fallbacks'."""
        return list(self._keys)

    def seal(self, plain: str, associated: str) -> bytes:
        nonce = os.urandom(_NONCE)
        aead = self._keys[self.current]
        return nonce + aead.encrypt(nonce, plain.encode("utf-8", "surrogatepass"), associated.encode())

    def open(self, blob: bytes, associated: str, sealed_by: str | None) -> str:
        """Open `blob` with the key whose id is `sealed_by` (every key when it is None)."""
        if sealed_by is not None and sealed_by not in self._keys:
            raise SealingError(f"sealed under data key {sealed_by}, which is not configured")
        candidates = [self._keys[sealed_by]] if sealed_by is not None else list(self._keys.values())
        for aead in candidates:
            try:
                plain = aead.decrypt(blob[:_NONCE], blob[_NONCE:], associated.encode())
            except InvalidTag:
                continue
            return plain.decode("utf-8", "surrogatepass")
        raise SealingError("a sealed value opens with none of the configured data keys")


def embedded_key(key_file: Path) -> bytes:
    """The default data key: a 0600 file beside the SQLite file, created on first start.

    Created with O_EXCL so two processes starting together cannot each write a different key.
    """
    key_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = base64.b64decode(key_file.read_text().strip(), validate=True)
        if len(key) != 32:
            raise SealingError(f"data key file {key_file} does not hold 32 bytes") from None
        return key
    key = AESGCM.generate_key(bit_length=256)
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.b64encode(key).decode() + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return key
