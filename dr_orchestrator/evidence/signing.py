"""Ed25519 keys for signing evidence packs. The private key is given by reference only:
``file:/path/to/key.pem`` (mode 600) or ``env:NAME`` (a variable holding the PEM), usually through
``$DR_PACK_SIGNING_KEY``. Key material is never printed."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_ENV = "DR_PACK_SIGNING_KEY"
PRIVATE_NAME = "dr-pack-signing.key"
PUBLIC_NAME = "dr-pack-signing.pub.pem"


class SigningKeyError(ValueError):
    """The key cannot be used; one sentence, never the key itself."""


def generate_keypair(directory: str | Path) -> tuple[Path, Path]:
    """A new key pair in ``directory``: the private key (PEM, mode 600) and the public key (PEM)."""
    where = Path(directory)
    where.mkdir(parents=True, exist_ok=True)
    private_path, public_path = where / PRIVATE_NAME, where / PUBLIC_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise SigningKeyError(f"{path} exists already: choose another directory or move it away")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(public_pem(key.public_key()))
    return private_path, public_path


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _private_pem(reference: str) -> bytes:
    scheme, _, rest = reference.partition(":")
    if scheme == "file" and rest:
        path = Path(rest)
        try:
            mode = path.stat().st_mode
            if stat.S_ISDIR(mode):
                raise SigningKeyError(f"the signing key {path} is a directory; give the key file in it "
                                      f"(e.g. {path / PRIVATE_NAME})")
            if mode & 0o077:
                raise SigningKeyError(f"the signing key {path} is readable by others: chmod 600 it")
            return path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read the signing key {path}: {exc.strerror}") from None
    if scheme == "env" and rest:
        value = os.environ.get(rest)
        if not value:
            raise SigningKeyError(f"the environment variable {rest} holding the signing key is not set")
        return value.encode()
    raise SigningKeyError(f"signing key reference {reference!r} is not file:/path or env:NAME")


def load_signing_key(reference: str | None = None) -> Ed25519PrivateKey:
    """The private key ``reference`` (else ``$DR_PACK_SIGNING_KEY``) points at."""
    reference = reference or os.environ.get(KEY_ENV)
    if not reference:
        raise SigningKeyError(
            f"no signing key: set {KEY_ENV}=file:/path/to/key.pem (create one with `dr evidence keygen`)"
        )
    pem = _private_pem(reference)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError("the signing key is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError("the signing key is not an Ed25519 key")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise SigningKeyError("the public key is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError("the public key is not an Ed25519 key")
    return key


def signature_valid(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
