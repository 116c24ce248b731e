"""The layers point one way (docs/architecture.md): checked over the import graph of every product module, lazy
imports inside functions included, so a shortcut cannot hide in a function body."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("edge", "sync", "provisioning", "models")

# layer -> the layers it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "wire": {"core", "wire"},
    "hub": {"core", "wire", "hub"},
    "box": {"core", "wire", "box"},
    "fleet": {"core", "wire", "fleet"},
    "models": {"core", "wire", "box", "models"},
}
# What fleet tooling may use of the others: signing and packaging models, the audit log, reading the hub's index.
FLEET_MAY_USE = ("edge.signing", "edge.modelpkg", "edge.modelpolicy", "edge.audit", "sync.hub.store", "sync.hub.store_pg")
# Test and demo helpers that live in the source tree: no product module may lean on them.
HELPERS = ("harness", "samples", "tests", "boxproc", "conftest", "modelfactory")


def layer(module: str) -> str:
    for prefix, name in (("sync.core", "core"), ("sync.wire", "wire"), ("sync.hub", "hub"), ("edge", "box"),
                         ("provisioning", "fleet"), ("models", "models")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "sync" if module == "sync" else "other"


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {_name(p): p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, *, toplevel: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in (tree.body if toplevel else ast.walk(tree)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_every_import_between_product_modules_follows_the_layer_rules():
    known = modules()
    wrong = []
    for name, path in known.items():
        if name.split(".")[0] == "edge" and name in ("harness", "samples"):
            continue  # the helpers themselves
        src = layer(name)
        for imp in imports(path, toplevel=False):
            if imp.split(".")[0] not in (*PRODUCT, *HELPERS):
                continue
            if imp.split(".")[0] in HELPERS:
                wrong.append(f"{name} -> {imp} (a test/demo helper)")
                continue
            if imp not in known and imp.rsplit(".", 1)[0] in known:
                imp = imp.rsplit(".", 1)[0]  # `from pkg.mod import Name`
            dst = layer(imp)
            if dst == "sync":
                continue  # the namespace package itself
            if src == "fleet" and dst in ("box", "hub"):
                if not imp.startswith(FLEET_MAY_USE) and imp not in ("edge", "sync.hub"):
                    wrong.append(f"{name} -> {imp} (fleet tooling into the daemons' internals)")
                continue
            if dst not in ALLOWED.get(src, set()):
                wrong.append(f"{name} -> {imp} ({src} may not import {dst})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules_at_import_time():
    known = modules()
    graph = {m: {i for i in imports(p, toplevel=True) if i in known and i != m} for m, p in known.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, [*trail, node]):
                return True
        state[node] = 2
        return False

    for m in sorted(graph):
        if m not in state and visit(m, []):
            break
    assert not cycle, " -> ".join(cycle)


def test_the_hub_imports_no_box_code_and_no_inference_runtime_or_opencv():
    """What `pip install .[hub]` must be able to run: the hub's modules, loaded, bring none of these."""
    probe = ("import sys\n"
             "import sync.hub.cli, sync.hub.receiver, sync.hub.store, sync.hub.metrics, sync.wire.codecs\n"
             "bad = [m for m in sys.modules if m.split('.')[0] in ('edge', 'provisioning', 'models', 'cv2', "
             "'onnxruntime', 'openvino', 'torch')]\n"
             "print(' '.join(sorted(bad)))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", out.stdout


@pytest.mark.parametrize("extra, forbidden", [("hub", ("onnxruntime", "openvino", "opencv-python-headless")),
                                               ("fleet", ("onnxruntime", "openvino", "opencv-python-headless"))])
def test_a_hub_or_fleet_install_declares_no_inference_runtime_or_opencv(extra, forbidden):
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"][extra]]
    names = {d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in wanted}
    assert not names & set(forbidden), names & set(forbidden)
    assert "onnxruntime" in {d.split(">")[0].split("=")[0].strip() for d in project["optional-dependencies"]["box"]}
