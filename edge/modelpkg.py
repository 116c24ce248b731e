"""Model packages on disk: signature and hash verification, strict manifest parsing, install and active versions."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge import signing
from sync.core.fsutil import atomic_write, fsync_dir, fsync_file
from sync.core.errors import BadInputError, ModelError, ModelIntegrityError, NotFoundError
from edge.modelmanifest import (  # noqa: F401 - the package's types and constants, used through modelpkg
    ACTIVATIONS, FORMAT, MANIFEST, ROUTING_KEYS, SIGNATURE, TASKS, _NAME_RE, _SHA256_RE, _VERSION_RE, ModelPackage,
    Thresholds, _parse_manifest,
)

log = logging.getLogger(__name__)

ACTIVE = "ACTIVE"
PREVIOUS = "PREVIOUS"

# Names become path components under models_dir, so they are restricted to a safe alphabet.
_CHUNK = 1 << 20


# --- verification -------------------------------------------------------------------------------------------

def load_package(folder: Path, trusted_keys: dict[str, Ed25519PublicKey]) -> ModelPackage:
    """Verify and parse the package in `folder`; raise ModelIntegrityError/ModelError, never return a partial one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError(f"model package folder {folder} does not exist")
    manifest_bytes = _read_bytes(folder / MANIFEST, "manifest.json")
    sig_path = folder / SIGNATURE
    if not sig_path.is_file():
        raise ModelIntegrityError(f"model package {folder} is unsigned: {SIGNATURE} is missing")
    signature = _read_bytes(sig_path, SIGNATURE)
    if len(signature) != 64:
        raise ModelIntegrityError(f"{sig_path}: an ed25519 signature is 64 raw bytes, got {len(signature)}")
    # Nothing in the manifest is looked at until the signature over its exact bytes verifies.
    try:
        kid = signing.verify(manifest_bytes, signature, trusted_keys)
    except ModelIntegrityError as err:
        raise ModelIntegrityError(f"model package {folder}: {err}") from err
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{folder / MANIFEST}: not valid UTF-8 JSON: {err}") from err
    package = _parse_manifest(manifest, folder, kid)
    _verify_files(folder, manifest["files"])
    log.info("model package %s verified (key %s)", package.id, kid)
    return package


def read_verified(package: ModelPackage, rel: str) -> bytes:
    """Bytes of a listed file, hashed again as read, so what a runtime loads is exactly what was signed."""
    expected = package.manifest["files"].get(rel)
    if expected is None:
        raise ModelIntegrityError(f"model package {package.id}: {rel} is not listed in the manifest")
    data = _read_bytes(package.folder / rel, rel)
    if hashlib.sha256(data).hexdigest() != expected:
        raise ModelIntegrityError(f"model package {package.id}: {rel} changed after verification")
    return data


def backend_relpath(package: ModelPackage, kind: str) -> str:
    return package.backend_files[kind].relative_to(package.folder).as_posix()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_trusted_keys(paths: list[Path]) -> dict[str, Ed25519PublicKey]:
    """Keys from hex `*.pub` files; a directory contributes every `*.pub` in it."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in map(Path, paths):
        files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        for file in files:
            kid, key = signing.load_public(file)
            keys[kid] = key
    return keys


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ModelIntegrityError(f"model package {path.parent}: {what} is missing") from err
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err}") from err


def _verify_files(folder: Path, files: dict[str, str]) -> None:
    root = folder.resolve()
    for rel, expected in files.items():
        path = folder / rel
        # A symlink could point the hash check at one file and the runtime at another place entirely.
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise ModelIntegrityError(f"model package {folder}: {rel} is a link or leaves the package folder")
        if not path.is_file():
            raise ModelIntegrityError(f"model package {folder}: listed file {rel} is missing")
        try:
            actual = sha256_file(path)
        except OSError as err:
            raise ModelError(f"model package {folder}: cannot read {rel}: {err}") from err
        if actual != expected:
            raise ModelIntegrityError(f"model package {folder}: sha256 of {rel} does not match the manifest")
    listed = set(files) | {MANIFEST, SIGNATURE}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if (path.is_file() or path.is_symlink()) and rel not in listed:
            raise ModelIntegrityError(f"model package {folder}: {rel} is not listed in the manifest")


# --- manifest parsing ---------------------------------------------------------------------------------------

def version_key(version: str) -> tuple[int, int, int]:
    match = _VERSION_RE.match(version)
    if not match:
        raise ModelError(f"version {version!r} is not MAJOR.MINOR.PATCH")
    return tuple(int(x) for x in match.groups())  # type: ignore[return-value]


def discover(models_dir: Path) -> list[Path]:
    """Package folders `<name>/<version>/` holding a manifest, by name then ascending version."""
    found = []
    for manifest in Path(models_dir).glob(f"*/*/{MANIFEST}"):
        folder = manifest.parent
        # Hidden names are install scratch space; other junk versions are skipped, not fatal.
        if folder.name.startswith(".") or folder.parent.name.startswith(".") or not _VERSION_RE.match(folder.name):
            continue
        found.append(folder)
    return sorted(found, key=lambda f: (f.parent.name, version_key(f.name)))


def versions(models_dir: Path, name: str) -> list[str]:
    return [f.name for f in discover(models_dir) if f.parent.name == name]


def active_version(models_dir: Path, name: str) -> str | None:
    """The ACTIVE file's version, else the highest installed one, else None."""
    active = _read_pointer(Path(models_dir) / name / ACTIVE)
    if active is not None:
        return active
    installed = versions(models_dir, name)
    return installed[-1] if installed else None


def inventory(models_dir: Path, trusted_keys: dict[str, Ed25519PublicKey]) -> list[dict]:
    """Every installed version: whether it is active and whether it verifies (the reason when it does not)."""
    rows = []
    for folder in discover(models_dir):
        name, version = folder.parent.name, folder.name
        try:
            load_package(folder, trusted_keys)
            status = "ok"
        except ModelError as err:
            status = f"refused: {err}"
        rows.append({"name": name, "version": version, "active": active_version(models_dir, name) == version,
                     "status": status})
    return rows


def describe(package: ModelPackage, models_dir: Path | None = None) -> dict:
    """What a technician or radiologist needs to know about a verified package, from its signed manifest."""
    m = package.manifest
    metrics = m.get("metrics") or {}
    return {
        "name": package.name, "version": package.version,
        "active": None if models_dir is None else active_version(models_dir, package.name) == package.version,
        "description": m.get("description", ""), "task": package.task, "labels": list(package.labels),
        "abnormal_labels": list(package.abnormal_labels),
        "thresholds": {"default": vars(package.thresholds),
                       **{k: vars(v) for k, v in package.backend_thresholds.items()}},
        "routing": [{k: list(v) for k, v in rule.items()} for rule in package.routing],
        "backends": sorted(package.backend_files),
        # the held-out test figures only: validation ones were tuned on and would flatter the model; an adapted
        # package's are the site's own (small) held-out part
        "test": metrics.get("test") or metrics.get("local_test"),
        "test_split": "test" if metrics.get("test") else "local_test" if metrics.get("local_test") else None,
        "test_model": "ONNX Runtime INT8",
        "training_data": m.get("training_data", {}), "created": m.get("created"), "signed_by": package.key_id,
        "card": str(package.folder / "MODEL_CARD.md") if (package.folder / "MODEL_CARD.md").is_file() else None,
    }


def package_folder(models_dir: Path, name: str, version: str) -> Path:
    """models_dir/name/version for a name and version a manifest could carry, nothing that walks elsewhere."""
    if not _NAME_RE.match(name) or not _VERSION_RE.match(version):
        raise BadInputError(f"{name!r} {version!r} is not a model name and version (e.g. cxr-triage 1.1.0)")
    return Path(models_dir) / name / version


def active_folders(models_dir: Path) -> list[Path]:
    """The folder of the active version of every installed model."""
    names = sorted({f.parent.name for f in discover(models_dir)})
    out = []
    for name in names:
        version = active_version(models_dir, name)
        folder = Path(models_dir) / name / str(version)
        if not (folder / MANIFEST).is_file():
            raise NotFoundError(f"model {name}: active version {version} is not installed")
        out.append(folder)
    return out


def activate(models_dir: Path, name: str, version: str) -> None:
    """Make `version` active, remembering the one it replaces in PREVIOUS for `rollback`."""
    model_dir = Path(models_dir) / name
    if not (model_dir / version / MANIFEST).is_file():
        raise NotFoundError(f"model {name} version {version} is not installed in {models_dir}")
    current = active_version(models_dir, name)
    if current is not None and current != version:
        _write_pointer(model_dir / PREVIOUS, current)
    _write_pointer(model_dir / ACTIVE, version)
    log.info("model %s: active version %s (was %s)", name, version, current)


def previous_version(models_dir: Path, name: str) -> str | None:
    return _read_pointer(Path(models_dir) / name / PREVIOUS)


def rollback(models_dir: Path, name: str) -> str:
    """Re-activate the previously active version; return it. Rolling back twice returns to where it started."""
    previous = _read_pointer(Path(models_dir) / name / PREVIOUS)
    if previous is None:
        raise NotFoundError(f"model {name} has no previous version to roll back to")
    activate(models_dir, name, previous)
    return previous


def install(src: Path, models_dir: Path, trusted_keys: dict[str, Ed25519PublicKey]) -> ModelPackage:
    """Verify a package folder or tar, copy it to `<models_dir>/<name>/<version>` atomically, verify the copy.

    Does not activate it (see `activate`), though with no ACTIVE file the highest version is active anyway.
    On any failure models_dir is left as it was.
    """
    src, models_dir = Path(src), Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    scratch: Path | None = None
    try:
        if src.is_file():
            scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=models_dir))
            src = _extract_tar(src, scratch)
        package = load_package(src, trusted_keys)
        return _place(package, models_dir, trusted_keys)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _place(package: ModelPackage, models_dir: Path, trusted_keys: dict[str, Ed25519PublicKey]) -> ModelPackage:
    model_dir = models_dir / package.name
    dest = model_dir / package.version
    if dest.exists():
        same = (dest / MANIFEST).is_file() and \
            (dest / MANIFEST).read_bytes() == (package.folder / MANIFEST).read_bytes()
        if same:
            log.info("model package %s is already installed", package.id)
            return load_package(dest, trusted_keys)
        raise ModelError(f"model {package.name} version {package.version} is already installed with other content")
    created_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".install-{package.version}-", dir=model_dir))
    try:
        # Only the signed files are copied, so nothing unlisted ever lands in the models tree.
        for rel in [MANIFEST, SIGNATURE, *package.manifest["files"]]:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package.folder / rel, target)
            fsync_file(target)
        # The copy is verified again: the source may be on flaky media, or change between check and copy.
        load_package(tmp, trusted_keys)
        os.rename(tmp, dest)
        fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_model_dir:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    log.info("installed model package %s into %s", package.id, dest)
    return load_package(dest, trusted_keys)


def _extract_tar(archive: Path, scratch: Path) -> Path:
    try:
        with tarfile.open(archive) as tar:
            # The "data" filter refuses absolute paths, "..", links out of the tree and device files.
            tar.extractall(scratch, filter="data")
    except (tarfile.TarError, OSError) as err:
        raise ModelIntegrityError(f"cannot unpack model archive {archive}: {err}") from err
    if (scratch / MANIFEST).is_file():
        return scratch
    entries = [p for p in scratch.iterdir()]
    if len(entries) == 1 and (entries[0] / MANIFEST).is_file():
        return entries[0]
    raise ModelError(f"model archive {archive} has no {MANIFEST} at its top level or in a single folder")


def _read_pointer(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ModelError(f"cannot read {path}: {err}") from err
    if not _VERSION_RE.match(value):
        raise ModelError(f"{path} holds {value!r}, not a MAJOR.MINOR.PATCH version")
    return value


def _write_pointer(path: Path, version: str) -> None:
    # tmp + fsync + rename: after a power cut the pointer is either the old version or the new one.
    atomic_write(path, (version + "\n").encode())
