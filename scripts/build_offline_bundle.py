"""Build the offline install bundle: a wheelhouse of Wasla and every runtime dependency, the systemd units and
install.sh, for a box that has never seen the internet (`pip install --no-index` from the bundle).

Usage:
    python scripts/build_offline_bundle.py --out dist/wasla-offline [--tar] \
        [--platform manylinux_2_28_aarch64 --python-version 3.11]   # for a box of another architecture

The box does not train: the `train` extra (torch, nncf) and the test extras are left out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The box's own tools; pip and setuptools travel too so the fresh venv can be upgraded offline later.
EXTRA_WHEELS = ["pip", "setuptools", "wheel"]


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def project_dependencies(extras: tuple[str, ...] = ("box",)) -> list[str]:
    """The core dependencies plus those of the machine's extra (a clinic box by default)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [*meta["dependencies"], *(d for e in extras for d in meta["optional-dependencies"][e])]


def build(out: Path, *, platform: str | None = None, python_version: str | None = None,
          pip: list[str] | None = None, sign_key: Path | None = None) -> Path:
    pip = pip or [sys.executable, "-m", "pip"]
    out = Path(out)
    wheels = out / "wheels"
    if out.exists():
        shutil.rmtree(out)
    wheels.mkdir(parents=True)
    # Wasla itself: a pure-Python wheel built from this checkout (setuptools from this venv, nothing fetched).
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(REPO)])
    target = []
    if platform:
        target += ["--platform", platform]
    if python_version:
        target += ["--python-version", python_version]
    # Binary wheels only: a box has no compiler, and a source build would need the network it does not have.
    run([*pip, "download", "--only-binary=:all:", "--dest", str(wheels), *target,
         *project_dependencies(), *EXTRA_WHEELS])
    shutil.copy2(REPO / "scripts" / "install_offline.sh", out / "install.sh")
    (out / "install.sh").chmod(0o755)
    (out / "systemd").mkdir()
    for unit in sorted([*(REPO / "systemd").glob("*.service"), *(REPO / "systemd").glob("*.conf")]):
        shutil.copy2(unit, out / "systemd" / unit.name)
    shutil.copy2(REPO / "README.md", out / "README.md")
    names = sorted(p.name for p in wheels.glob("*.whl"))
    (out / "BUNDLE.json").write_text(json.dumps({"wheels": names, "platform": platform or "this machine",
                                                 "python": python_version or sys.version.split()[0]}, indent=2) + "\n")
    _requirements(wheels)
    _checksums(out)
    if sign_key is not None:
        _sign(out, sign_key)
    print(f"offline bundle: {out} ({len(names)} wheels, {_size_mb(out):.0f} MB)"
          + (", SHA256SUMS signed" if sign_key else ", unsigned"))
    return out


def _requirements(wheels: Path) -> None:
    """wheels/requirements.txt: every wheel pinned with its sha256, for `pip install --require-hashes`: pip then
    refuses any file that is not exactly the one built here, even one that SHA256SUMS was edited to match."""
    lines = []
    for whl in sorted(wheels.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        lines.append(f"{name}=={version} --hash=sha256:{hashlib.sha256(whl.read_bytes()).hexdigest()}")
    (wheels / "requirements.txt").write_text("\n".join(lines) + "\n")


def _sign(out: Path, key_path: Path) -> None:
    """SHA256SUMS.sig: an ed25519 signature of SHA256SUMS with the fleet's model key (install.sh checks it with
    openssl against the fleet key the box already trusts, before anything from the bundle runs)."""
    sys.path.insert(0, str(REPO))
    from edge import signing

    key = signing.load_private(key_path)
    (out / "SHA256SUMS.sig").write_bytes(signing.sign((out / "SHA256SUMS").read_bytes(), key))


def _checksums(out: Path) -> None:
    lines = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS", "SHA256SUMS.sig")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(out).as_posix()}")
    (out / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def make_tar(folder: Path) -> Path:
    dest = folder.with_name(folder.name + ".tar")
    with tarfile.open(dest, "w") as tar:  # wheels are already compressed
        tar.add(folder, arcname=folder.name)
    print(f"tarball: {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "dist" / "wasla-offline", help="output folder (replaced)")
    ap.add_argument("--tar", action="store_true", help="also write <out>.tar")
    ap.add_argument("--platform", help="pip platform tag of the box, e.g. manylinux_2_28_aarch64")
    ap.add_argument("--python-version", help="the box's Python, e.g. 3.11")
    ap.add_argument("--sign-key", type=Path, help="the fleet's model-signing key (fleet/keys/model-signing.key): "
                    "signs SHA256SUMS so boxes can check the bundle")
    args = ap.parse_args(argv)
    try:
        folder = build(args.out, platform=args.platform, python_version=args.python_version, sign_key=args.sign_key)
    except subprocess.CalledProcessError as err:
        print(f"error: {' '.join(err.cmd)} failed with {err.returncode}", file=sys.stderr)
        return 1
    if args.tar:
        make_tar(folder)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
