"""A model package's manifest, parsed strictly: every key checked, the package's typed description built."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edge.preprocess import Preprocess
from sync.core.errors import ModelError, ModelIntegrityError

FORMAT = 1
ROUTING_KEYS = ("Modality", "BodyPartExamined", "SOPClassUID", "ViewPosition")
TASKS = ("binary", "multiclass")
ACTIVATIONS = ("softmax", "probabilities")
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = ("format", "name", "version", "task", "labels", "abnormal_labels", "thresholds", "input", "output",
             "routing", "backends", "files", "signing_key_id")
_INPUT_CHOICES = {"colour": ("grey3", "rgb"), "resize": ("squash", "letterbox"), "frames": ("middle", "first", "all")}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


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

    thresholds, backend_thresholds = _parse_thresholds(m, bad)
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

    backends = _parse_files(m, bad)

    return ModelPackage(
        name=m["name"], version=m["version"], folder=folder, manifest=m, input_spec=input_spec,
        labels=tuple(labels), abnormal_labels=tuple(abnormal),
        thresholds=thresholds, backend_thresholds=backend_thresholds, routing=routing,
        backend_files={kind: folder / rel for kind, rel in backends.items()}, key_id=kid,
        task=m["task"], activation=out["activation"], output_name=out["name"],
        review_if_confidence_below=None if low_conf is None else float(low_conf),
    )


def _parse_thresholds(m: dict, bad) -> tuple[Thresholds, dict[str, Thresholds]]:
    """The package's review/urgent pair and any per-backend pairs (each backend named in `backends`)."""
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
    return thresholds, backend_thresholds


def _parse_files(m: dict, bad) -> dict:
    """`files` (path -> sha256, never the manifest or signature) and `backends` (backend -> a listed file)."""
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
    return backends


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
