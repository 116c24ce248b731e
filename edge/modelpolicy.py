"""The model floor: a fleet-signed policy of minimum versions and revoked packages that activation and loading obey.

Every signed package stays valid forever, so without a floor a stolen or tampered box could be made to run an old
model with known misses just by installing it. The policy is signed with the fleet's model key (the same key as the
packages), carries a serial that only grows (an older policy cannot be replayed), and lives beside the packages:

    <models_dir>/policy.json   {"format": "wasla-model-policy/1", "serial": 3, "issued": "...",
                                "floors": {"cxr-triage": "1.2.0"},
                                "revoked": [{"name": "cxr-triage", "version": "1.1.1", "reason": "..."}]}
    <models_dir>/policy.sig    ed25519 signature of policy.json's bytes (any X.json travels with its X.sig)
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge import signing
from sync.core.errors import ModelError, ModelIntegrityError
from sync.core.fsutil import atomic_write

log = logging.getLogger(__name__)

FORMAT = "wasla-model-policy/1"
POLICY, SIGNATURE = "policy.json", "policy.sig"


class RefusedByPolicy(ModelError):
    """A package below its model's floor or revoked by the fleet: never activated, never loaded."""


@dataclass(frozen=True)
class Policy:
    serial: int = 0
    floors: dict[str, str] = field(default_factory=dict)
    revoked: dict[tuple[str, str], str] = field(default_factory=dict)

    def check(self, name: str, version: str) -> None:
        from edge.modelpkg import version_key

        reason = self.revoked.get((name, version))
        if reason is not None:
            raise RefusedByPolicy(f"model {name} {version} is revoked by the fleet: {reason}")
        floor = self.floors.get(name)
        if floor is not None and version_key(version) < version_key(floor):
            raise RefusedByPolicy(f"model {name} {version} is below the fleet's minimum version {floor}")


def parse(data: bytes) -> Policy:
    from edge.modelpkg import version_key

    try:
        obj = json.loads(data)
        if obj.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        serial = obj["serial"]
        if not isinstance(serial, int) or serial < 1:
            raise ValueError("serial must be a positive integer")
        floors = {str(k): str(v) for k, v in (obj.get("floors") or {}).items()}
        for v in floors.values():
            version_key(v)
        revoked = {(str(r["name"]), str(r["version"])): str(r.get("reason") or "no reason given")
                   for r in obj.get("revoked") or []}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelIntegrityError(f"model policy is malformed: {err}") from err
    return Policy(serial, floors, revoked)


def load(models_dir: Path, trusted: dict[str, Ed25519PublicKey]) -> Policy:
    """The installed policy, verified; an empty one when none is installed. A bad signature is an error."""
    folder = Path(models_dir)
    path = folder / POLICY
    if not path.exists():
        return Policy()
    data = path.read_bytes()
    signing.verify(data, (folder / SIGNATURE).read_bytes() if (folder / SIGNATURE).exists() else b"", trusted)
    return parse(data)


def install(src_json: Path, models_dir: Path, trusted: dict[str, Ed25519PublicKey]) -> Policy:
    """Verify a policy and its signature (src_json with .sig beside it) and install it, if it is newer."""
    src_json = Path(src_json)
    data, sig = src_json.read_bytes(), src_json.with_suffix(".sig").read_bytes()
    signing.verify(data, sig, trusted)
    new = parse(data)
    folder = Path(models_dir)
    current = load(folder, trusted)
    if new.serial < current.serial:
        raise RefusedByPolicy(f"model policy serial {new.serial} is older than the installed {current.serial}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in ((SIGNATURE, sig), (POLICY, data)):  # signature first: a crash leaves the old policy valid
        atomic_write(folder / name, blob, durable_dir=False)
    log.info("model policy serial %d installed (%d floor(s), %d revocation(s))", new.serial, len(new.floors),
             len(new.revoked))
    return new


def write_signed(path: Path, key: Ed25519PrivateKey, *, serial: int, floors: dict[str, str] | None = None,
                 revoked: list[dict] | None = None, issued: str = "") -> Path:
    """For the fleet (wasla-fleet model-policy): write policy.json and policy.sig side by side."""
    obj = {"format": FORMAT, "serial": serial, "issued": issued, "floors": floors or {}, "revoked": revoked or []}
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    parse(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.with_suffix(".sig").write_bytes(signing.sign(data, key))
    return path
