"""Tiny but real signed model packages for tests: an ONNX graph whose abnormal score follows image brightness."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge import signing

PRIVATE_KEY = "model-signing.key"
PUBLIC_KEY = "model-signing.pub"
# Logit gain on mean brightness (in normalised units, -1 black .. +1 white): white -> p(abnormal) ~ 0.9975.
GAIN = 6.0


def tiny_model(size: int, labels: tuple[str, ...], abnormal: tuple[str, ...]) -> onnx.ModelProto:
    """input (1,3,size,size) -> global average pool -> MatMul -> logits (1,len(labels)); bright means abnormal."""
    n = len(labels)
    # Each abnormal label gets +gain per unit brightness, each normal label -gain; spread over the 3 channels.
    signs = np.array([1.0 if lab in abnormal else -1.0 for lab in labels], dtype=np.float32)
    weights = np.tile(signs * GAIN / 3.0, (3, 1)).astype(np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
    ]
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [3, n], weights.flatten().tolist()),
             helper.make_tensor("B", TensorProto.FLOAT, [n], [0.0] * n)]
    return _model(nodes, inits, size, n, "tiny-brightness")


def nan_model(size: int, n_labels: int) -> onnx.ModelProto:
    """A model whose every output is NaN: Log of (-1 - |mean|), a negative number for any input."""
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Abs", ["flat"], ["abs"]),
        helper.make_node("MatMul", ["abs", "W"], ["mm"]),
        helper.make_node("Sub", ["minus_one", "mm"], ["negative"]),
        helper.make_node("Log", ["negative"], ["logits"]),
    ]
    inits = [helper.make_tensor("W", TensorProto.FLOAT, [3, n_labels], [1.0] * (3 * n_labels)),
             helper.make_tensor("minus_one", TensorProto.FLOAT, [], [-1.0])]
    return _model(nodes, inits, size, n_labels, "nan")


def _model(nodes, inits, size: int, n_out: int, graph_name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, graph_name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, n_out])],
        initializer=inits)
    # Pinned IR/opset versions that every supported onnxruntime and openvino release reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="wasla-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def signing_key(key_dir: Path) -> tuple[Path, Path]:
    """(private, public) key paths in key_dir, generated on first use so packages in one key_dir share a key."""
    key_dir = Path(key_dir)
    priv, pub = key_dir / PRIVATE_KEY, key_dir / PUBLIC_KEY
    if not (priv.is_file() and pub.is_file()):
        signing.generate_keypair(priv, pub)
    return priv, pub


def write_signed_manifest(folder: Path, manifest: dict[str, Any], private_key: Path) -> None:
    """Write manifest.json (sorted keys, 2-space indent) and its raw signature, setting signing_key_id."""
    key = signing.load_private(private_key)
    manifest = dict(manifest, signing_key_id=signing.public_key_id(key))
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    (folder / "manifest.json").write_bytes(data)
    (folder / "manifest.sig").write_bytes(signing.sign(data, key))


def make_tiny_package(
    dest: Path, *, name: str = "tiny-cxr", version: str = "1.0.0",
    labels: tuple[str, ...] = ("normal", "pneumonia"), abnormal: tuple[str, ...] = ("pneumonia",),
    routing: list[dict[str, list[str]]] | None = None,
    thresholds: dict[str, float] | None = None, size: int = 64, key_dir: Path,
    task: str | None = None, review_if_confidence_below: float | None = None,
    model: onnx.ModelProto | None = None, edit_manifest: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, Path]:
    """Build `<dest>/<name>/<version>/`, signed with the key in key_dir; return (package folder, public key path).

    `model` replaces the brightness model; `edit_manifest` may change the manifest after hashing, before signing.
    """
    routing = [{"Modality": ["CR", "DX"], "BodyPartExamined": ["CHEST", ""]}] if routing is None else routing
    thresholds = {"review": 0.3, "urgent": 0.8} if thresholds is None else thresholds
    folder = Path(dest) / name / version
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model(size, tuple(labels), tuple(abnormal)) if model is None else model
    contents = {
        "model.onnx": model.SerializeToString(),
        "MODEL_CARD.md": f"# {name} {version}\n\nTest fixture. Not for clinical use.\n".encode(),
        "evaluation.json": json.dumps({"note": "synthetic test fixture"}).encode(),
    }
    for rel, data in contents.items():
        (folder / rel).write_bytes(data)
    manifest: dict[str, Any] = {
        "format": 1, "name": name, "version": version,
        "task": task or ("binary" if len(labels) == 2 else "multiclass"),
        "description": "Brightness test fixture. Not for clinical use.",
        "labels": list(labels), "abnormal_labels": list(abnormal), "thresholds": dict(thresholds),
        "review_if_confidence_below": review_if_confidence_below,
        "input": {"name": "input", "shape": [1, 3, size, size], "colour": "grey3", "resize": "squash",
                  "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "frames": "middle"},
        "output": {"name": "logits", "activation": "softmax"},
        "routing": routing,
        "backends": {"onnxruntime": "model.onnx", "openvino": "model.onnx"},
        "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()},
        "training_data": {"name": "none", "licence": "CC0-1.0", "attribution": "synthetic", "doi": ""},
        "metrics": {},
        "created": "2026-01-01T00:00:00Z",
    }
    if edit_manifest is not None:
        edit_manifest(manifest)
    private, public = signing_key(key_dir)
    write_signed_manifest(folder, manifest, private)
    return folder, public


def brightness_tensor(brightness: float, size: int = 64) -> np.ndarray:
    """A uniform normalised input: brightness -1 is black, +1 white (what to_tensor gives with mean/std 0.5)."""
    return np.full((1, 3, size, size), brightness, dtype=np.float32)
