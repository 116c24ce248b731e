#!/usr/bin/env bash
# Installs what Wasla needs on a fresh Debian 12 / Ubuntu 24.04 machine: system packages, a virtualenv, the package.
# Usage: bash scripts/setup.sh [extras]   (extras default "samples"; the tests use "test,train")
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-box,hub,fleet,samples}"

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [[ "$EXTRAS" == *test* || "$EXTRAS" == *dev* ]]; then  # the link-emulator tests ping across network namespaces
  command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)
  command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
  command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)  # the unit checks (verify, security)
  # tests/test_orthanc.py: a real PACS (binary "Orthanc") receives the box's SR/SC by C-STORE
  command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc)
  # tests/test_hub_store_pg.py: a real PostgreSQL server (its own cluster, started by the test) holds the hub index
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
  # tests/test_web_worklist.py: the radiologists' worklist in a real headless browser (selenium drives it)
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
  # dciodvfy (dicom3tools): the box's SR/SC and the hub's read report are checked against the standard's IODs
  command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "Installing system packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { echo "Python >= 3.11 is required" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch pinned to the CPU build: a plain "torch" would pull gigabytes of CUDA.
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v -E "^(WARNING: Location|DEPRECATION)" || true
.venv/bin/python -c 'import edge, pydicom, pynetdicom, onnxruntime, openvino' || { echo "installation failed" >&2; exit 1; }
