"""Ed25519 signing and verification of model-package manifests (raw keys stored hex-encoded)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from sync.core.errors import ModelIntegrityError, WaslaError


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (private file 0600); return its key id."""
    key = Ed25519PrivateKey.generate()
    raw_priv = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raw_pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.touch(mode=0o600, exist_ok=True)
    private_path.chmod(0o600)
    private_path.write_text(raw_priv.hex() + "\n")
    public_path.write_text(raw_pub.hex() + "\n")
    return key_id(raw_pub)


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(Path(path).read_text().strip()))
    except (OSError, ValueError) as err:
        raise WaslaError(f"cannot read signing key {path}: {err}") from err


def load_public(path: Path) -> tuple[str, Ed25519PublicKey]:
    """Return (key id, key) for a hex-encoded raw public key file."""
    try:
        raw = bytes.fromhex(Path(path).read_text().strip())
        return key_id(raw), Ed25519PublicKey.from_public_bytes(raw)
    except (OSError, ValueError) as err:
        raise ModelIntegrityError(f"cannot read trusted key {path}: {err}") from err


def public_key_id(key: Ed25519PrivateKey) -> str:
    return key_id(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(data)


def verify(data: bytes, signature: bytes, trusted: dict[str, Ed25519PublicKey]) -> str:
    """Return the id of the trusted key that signed `data`; raise ModelIntegrityError otherwise."""
    if not trusted:
        raise ModelIntegrityError("no trusted model-signing key is configured")
    for kid, pub in trusted.items():
        try:
            pub.verify(signature, data)
            return kid
        except InvalidSignature:
            continue
    raise ModelIntegrityError("signature does not verify against any trusted key (unsigned, tampered or foreign-signed)")
