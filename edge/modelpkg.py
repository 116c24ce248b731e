"""Model packages on disk: signature and hash verification, strict manifest parsing, install and active versions."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge import signing
from sync.core.errors import BadInputError, ModelError, ModelIntegrityError, NotFoundError
from edge.preprocess import Preprocess

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
ACTIVE = "ACTIVE"
PREVIOUS = "PREVIOUS"
ROUTING_KEYS = ("Modality", "BodyPartExamined", "SOPClassUID", "ViewPosition")
TASKS = ("binary", "multiclass")
ACTIVATIONS = ("softmax", "probabilities")

_REQUIRED = ("format", "name", "version", "task", "labels", "abnormal_labels", "thresholds", "input", "output",
             "routing", "backends", "files", "signing_key_id")
_INPUT_CHOICES = {"colour": ("grey3", "rgb"), "resize": ("squash", "letterbox"), "frames": ("middle", "first", "all")}
# Names become path components under models_dir, so they are restricted to a safe alphabet.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Thresholds:
    review: float
    urgent: float


@dataclass(frozen=True, eq=False)
class ModelPackage:
    """A verified package. Only `load_package` builds one, so holding one means its checks passed.

    Compared and hashed by identity, so packages can key dicts (e.g. package -> backend).
    """

    name: str
    version: str
    folder: Path
    manifest: dict[str, Any]
    input_spec: dict[str, Any]
    labels: tuple[str, ...]
    abnormal_labels: tuple[str, ...]
    thresholds: Thresholds
    routing: tuple[dict[str, tuple[str, ...]], ...]
    backend_files: dict[str, Path]
    key_id: str
    task: str = "binary"
    activation: str = "softmax"
    output_name: str = "logits"
    review_if_confidence_below: float | None = None
    backend_thresholds: dict[str, Thresholds] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def thresholds_for(self, backend: str | None) -> Thresholds:
        """The backend's own thresholds when the manifest has them: INT8 models from two quantisers shift scores
        differently, and thresholds calibrated per model keep the two backends on the same triage band."""
        return self.backend_thresholds.get(backend or "", self.thresholds)


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

def _parse_manifest(m: Any, folder: Path, kid: str) -> ModelPackage:
    def bad(msg: str, cls: type[ModelError] = ModelError) -> ModelError:
        return cls(f"{folder / MANIFEST}: {msg}")

    if not isinstance(m, dict):
        raise bad("top level must be an object")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise bad(f"missing required keys {missing}")
    if m["format"] != FORMAT or isinstance(m["format"], bool):
        raise bad(f"format {m['format']!r} is not supported (expected {FORMAT})")
    if not isinstance(m["name"], str) or not _NAME_RE.match(m["name"]):
        raise bad(f"name {m['name']!r} must match {_NAME_RE.pattern}")
    if not isinstance(m["version"], str) or not _VERSION_RE.match(m["version"]):
        raise bad(f"version {m['version']!r} must be MAJOR.MINOR.PATCH")
    if m["signing_key_id"] != kid:
        raise ModelIntegrityError(f"{folder / MANIFEST}: signing_key_id {m['signing_key_id']!r} "
                                  f"is not the key that signed it ({kid})")
    if m["task"] not in TASKS:
        raise bad(f"task {m['task']!r} must be one of {TASKS}")

    labels = _str_list(m["labels"], "labels", bad)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise bad("labels must list at least two distinct labels")
    if m["task"] == "binary" and len(labels) != 2:
        raise bad(f"a binary task has exactly two labels, got {len(labels)}")
    abnormal = _str_list(m["abnormal_labels"], "abnormal_labels", bad)
    if not abnormal or len(set(abnormal)) != len(abnormal) or not set(abnormal) < set(labels):
        raise bad("abnormal_labels must be distinct labels from `labels`, not empty and not all of them")

    th = m["thresholds"]
    if not isinstance(th, dict) or not {"review", "urgent"} <= set(th) <= {"review", "urgent", "by_backend"}:
        raise bad("thresholds must be {\"review\": number, \"urgent\": number[, \"by_backend\": {...}]}")
    thresholds = _thresholds(th, "thresholds", bad)
    by_backend = th.get("by_backend", {})
    if not isinstance(by_backend, dict):
        raise bad("thresholds.by_backend must be an object of backend -> {review, urgent}")
    backend_thresholds = {}
    for kind, value in by_backend.items():
        if not isinstance(m["backends"], dict) or kind not in m["backends"]:
            raise bad(f"thresholds.by_backend names {kind!r}, which is not in backends")
        if not isinstance(value, dict) or set(value) != {"review", "urgent"}:
            raise bad(f"thresholds.by_backend.{kind} must be {{\"review\": number, \"urgent\": number}}")
        backend_thresholds[kind] = _thresholds(value, f"thresholds.by_backend.{kind}", bad)
    low_conf = m.get("review_if_confidence_below")
    if low_conf is not None:
        if m["task"] != "multiclass":
            raise bad("review_if_confidence_below applies to multiclass tasks only")
        if not _is_num(low_conf) or not 0 <= low_conf <= 1:
            raise bad(f"review_if_confidence_below {low_conf!r} must be null or a number in [0, 1]")

    input_spec = _parse_input(m["input"], bad)
    out = m["output"]
    if not isinstance(out, dict) or not isinstance(out.get("name"), str) or out.get("activation") not in ACTIVATIONS:
        raise bad(f"output must be {{\"name\": str, \"activation\": one of {ACTIVATIONS}}}")
    routing = _parse_routing(m["routing"], bad)

    files = m["files"]
    if not isinstance(files, dict) or not files:
        raise bad("files must be a non-empty object of path -> sha256")
    for rel, digest in files.items():
        _check_relpath(rel, bad)
        if rel in (MANIFEST, SIGNATURE):
            raise bad(f"files must not list {rel}")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise bad(f"sha256 of {rel} must be 64 lowercase hex characters")
    backends = m["backends"]
    if not isinstance(backends, dict) or not backends:
        raise bad("backends must be a non-empty object of backend -> file")
    for kind, rel in backends.items():
        if not isinstance(rel, str):
            raise bad(f"backend {kind!r} file must be a string")
        _check_relpath(rel, bad)
        if rel not in files:
            raise bad(f"backend {kind!r} file {rel} is not listed in files")
        # An IR's weights are read implicitly by OpenVINO; they must be covered by a hash too.
        if rel.endswith(".xml") and rel[:-4] + ".bin" not in files:
            raise bad(f"backend {kind!r} file {rel} needs {rel[:-4]}.bin listed in files")

    return ModelPackage(
        name=m["name"], version=m["version"], folder=folder, manifest=m, input_spec=input_spec,
        labels=tuple(labels), abnormal_labels=tuple(abnormal),
        thresholds=thresholds, backend_thresholds=backend_thresholds, routing=routing,
        backend_files={kind: folder / rel for kind, rel in backends.items()}, key_id=kid,
        task=m["task"], activation=out["activation"], output_name=out["name"],
        review_if_confidence_below=None if low_conf is None else float(low_conf),
    )


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def _str_list(v: Any, key: str, bad) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise bad(f"{key} must be a list of non-empty strings")
    return v


def _check_relpath(rel: Any, bad) -> None:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise bad(f"file path {rel!r} must be a non-empty POSIX relative path", ModelIntegrityError)
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or PurePosixPath(rel).is_absolute() or any(p in ("..", ".", "") for p in parts) \
            or rel != PurePosixPath(rel).as_posix() or re.match(r"^[A-Za-z]:", rel):
        raise bad(f"file path {rel!r} escapes the package folder or is not normalised", ModelIntegrityError)


def _thresholds(th: dict, where: str, bad) -> Thresholds:
    if not all(_is_num(th[k]) for k in ("review", "urgent")):
        raise bad(f"{where}: review and urgent must be numbers")
    if not 0 <= th["review"] <= th["urgent"] <= 1:
        raise bad(f"{where} must satisfy 0 <= review ({th['review']}) <= urgent ({th['urgent']}) <= 1")
    return Thresholds(float(th["review"]), float(th["urgent"]))


def _parse_input(spec: Any, bad) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise bad("input must be an object")
    shape = spec.get("shape")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise bad("input.name must be the graph input name")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and not isinstance(d, bool)
                                                                 and d > 0 for d in shape)
            and shape[0] == 1 and shape[1] == 3):
        raise bad(f"input.shape {shape!r} must be [1, 3, H, W] with positive integers")
    for key, choices in _INPUT_CHOICES.items():
        if spec.get(key) not in choices:
            raise bad(f"input.{key} {spec.get(key)!r} must be one of {choices}")
    for key in ("mean", "std"):
        v = spec.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_is_num(x) for x in v)):
            raise bad(f"input.{key} must be three numbers")
    if any(x <= 0 for x in spec["std"]):
        raise bad("input.std must be positive")
    try:
        Preprocess.from_manifest(spec.get("preprocess"))
    except ModelError as err:
        raise bad(str(err)) from err
    return spec


def _parse_routing(rules: Any, bad) -> tuple[dict[str, tuple[str, ...]], ...]:
    if not isinstance(rules, list) or not rules:
        raise bad("routing must be a non-empty list of rules")
    parsed = []
    for rule in rules:
        if not isinstance(rule, dict):
            raise bad("each routing rule must be an object")
        unknown = set(rule) - set(ROUTING_KEYS)
        if unknown:
            raise bad(f"routing keys {sorted(unknown)} are not among {ROUTING_KEYS}")
        for key, values in rule.items():
            if not isinstance(values, list) or not values or not all(isinstance(x, str) for x in values):
                raise bad(f"routing {key} must be a non-empty list of strings")
        parsed.append({k: tuple(v) for k, v in rule.items()})
    return tuple(parsed)


# --- the models directory -----------------------------------------------------------------------------------

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
            _fsync_file(target)
        # The copy is verified again: the source may be on flaky media, or change between check and copy.
        load_package(tmp, trusted_keys)
        os.rename(tmp, dest)
        _fsync_dir(model_dir)
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
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
