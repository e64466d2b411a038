"""AES-256-GCM for raw tokens at rest, and the data key it needs.

The token hash is the associated data, so a sealed blob copied onto another incident's row fails to
open instead of probing with the wrong key.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_NONCE = 12


class SealingError(Exception):
    """A sealed token could not be opened: wrong data key, or a tampered row."""


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, token: str, token_hash: str) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, token.encode("utf-8", "surrogatepass"), token_hash.encode())

    def open(self, blob: bytes, token_hash: str) -> str:
        try:
            plain = self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], token_hash.encode())
        except InvalidTag:
            raise SealingError("sealed token did not authenticate (wrong data key?)") from None
        return plain.decode("utf-8", "surrogatepass")


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
