#!/usr/bin/env bash
# Installs Wasla on a machine with no network, from the offline bundle this script sits in (wheels/, systemd/),
# and optionally a box enrolment bundle from `wasla-fleet enroll` (folder or .tar.gz from the USB stick).
#
# Usage (as root):  bash install.sh [--box /media/usb/tamanrasset-01.tar.gz] [--prefix /opt/wasla]
#        no system changes (user, units, /etc):  bash install.sh --prefix DIR --no-system
# Needs python3 >= 3.11 with the venv module (Debian: python3-venv, part of the box's base image).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PREFIX=/opt/wasla
BOX=""
SYSTEM=1
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --box) BOX="$2"; shift 2 ;;
    --no-system) SYSTEM=0; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

echo "checking the bundle's checksums"
(cd "$HERE" && sha256sum --quiet -c SHA256SUMS)

"$PY" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "python3 >= 3.11 with venv/ensurepip is required" >&2; exit 1; }

# Nothing but the bundle's wheels: no index, and no pip configuration of this machine (find-links, mirrors).
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT || true
mkdir -p "$PREFIX"
[ -x "$PREFIX/.venv/bin/python" ] || "$PY" -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/python" -m pip install --quiet --no-index --find-links "$HERE/wheels" --upgrade wasla
"$PREFIX/.venv/bin/wasla" --help >/dev/null
echo "installed: $PREFIX/.venv/bin/wasla ($("$PREFIX/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("wasla"))'))"

if [ "$SYSTEM" -eq 0 ]; then
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "system install needs root (or use --no-system)" >&2; exit 1; }

id wasla >/dev/null 2>&1 || useradd --system --home-dir /var/lib/wasla --no-create-home --shell /usr/sbin/nologin wasla
install -d -m 0755 /etc/wasla
install -d -m 0700 /etc/wasla/credentials
for unit in "$HERE"/systemd/*.service; do
  sed "s#/opt/wasla/.venv#$PREFIX/.venv#g" "$unit" > "/etc/systemd/system/$(basename "$unit")"
done
# TCP tuned for the satellite uplink (BBR, no timestamps); applied now where the kernel allows, else at boot.
if [ -f "$HERE/systemd/60-wasla-link.conf" ]; then
  modprobe tcp_bbr 2>/dev/null || true
  install -m 0644 "$HERE/systemd/60-wasla-link.conf" /etc/sysctl.d/60-wasla-link.conf
  sysctl -q -p /etc/sysctl.d/60-wasla-link.conf || echo "note: sysctl settings apply at the next boot" >&2
fi

if [ -n "$BOX" ]; then
  src="$BOX"
  if [ -f "$BOX" ]; then
    tmp="$(mktemp -d)"
    tar -xzf "$BOX" -C "$tmp" --no-same-owner
    src="$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n1)"
  fi
  [ -f "$src/box.toml" ] || { echo "$BOX is not a box bundle (no box.toml)" >&2; exit 1; }
  install -m 0644 "$src/box.toml" "$src/ca.crt" "$src/model-signing.pub" /etc/wasla/
  for f in "$src"/credentials/*; do
    install -m 0600 -o root -g root "$f" /etc/wasla/credentials/
  done
  if [ -f "$src/credentials/pseudonym.key" ]; then
    install -d /etc/systemd/system/wasla-box.service.d
    printf '[Service]\nLoadCredential=pseudonym.key:/etc/wasla/credentials/pseudonym.key\n' \
      > /etc/systemd/system/wasla-box.service.d/pseudonym.conf
  fi
  echo "box $(sed -n 's/^id = "\(.*\)"/\1/p' /etc/wasla/box.toml | head -n1) configured in /etc/wasla"
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
echo "next: $PREFIX/.venv/bin/wasla --config /etc/wasla/box.toml doctor && systemctl enable --now wasla-box"
