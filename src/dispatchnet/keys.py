"""ed25519 keys: key files, signing with a domain-separation prefix, verification."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

KEY_FILE_HEADER = "dispatch-ed25519-seed-v1"


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 signing key and its public half."""

    signing_key: SigningKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> KeyPair:
        return cls(SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def public_hex(self) -> str:
        return self.public_key.hex()

    def sign(self, context: bytes, message: bytes) -> bytes:
        """Signs context || message; context separates the uses of one key."""
        return bytes(self.signing_key.sign(context + message).signature)


def verify(public_key: bytes, context: bytes, message: bytes, signature: bytes) -> bool:
    """True if signature is public_key's ed25519 signature over context || message."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        VerifyKey(public_key).verify(context + message, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


def load_or_create(path: Path) -> KeyPair:
    """Loads the key file at path, creating it (mode 0600) with a new key if missing."""
    path = Path(path).expanduser()
    if path.exists():
        return load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = KeyPair.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{KEY_FILE_HEADER}\n{bytes(key.signing_key).hex()}\n")
    return key


def load(path: Path) -> KeyPair:
    """Loads a key file written by load_or_create; raises ValueError when malformed."""
    lines = Path(path).expanduser().read_text().split()
    if len(lines) != 2 or lines[0] != KEY_FILE_HEADER:
        raise ValueError(f"{path} is not a Dispatch key file")
    try:
        seed = bytes.fromhex(lines[1])
    except ValueError as e:
        raise ValueError(f"{path}: the key is not hex") from e
    if len(seed) != 32:
        raise ValueError(f"{path}: the key must be 32 bytes")
    return KeyPair.from_seed(seed)


def default_home() -> Path:
    """Where the CLI keeps key files: $DISPATCH_HOME, else ~/.dispatch."""
    return Path(os.environ.get("DISPATCH_HOME", "~/.dispatch")).expanduser()
