#!/usr/bin/env bash
# Installs Wasla on a machine with no network, from the offline bundle this script sits in (wheels/, systemd/),
# and optionally a box enrolment bundle from `wasla-fleet enroll` (folder or .tar.gz from the USB stick).
#
# Usage (as root):  bash install.sh [--box /media/usb/tamanrasset-01.tar.gz] [--prefix /opt/wasla]
#        no system changes (user, units, sysctl):  bash install.sh --prefix DIR --no-system [--etc DIR]
#        the fleet key to check the bundle's signature with: --fleet-key FILE (default: /etc/wasla's, then the
#        box bundle's); --unsigned accepts a bundle without SHA256SUMS.sig (development builds only)
# Needs python3 >= 3.11 with the venv module (Debian: python3-venv) and openssl.
set -euo pipefail
umask 077
HERE="$(cd "$(dirname "$0")" && pwd)"
PREFIX=/opt/wasla
ETC=/etc/wasla
BOX=""
SYSTEM=1
FLEET_KEY=""
UNSIGNED=0
PY="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="$2"; shift 2 ;;
    --box) BOX="$2"; shift 2 ;;
    --etc) ETC="$2"; shift 2 ;;
    --fleet-key) FLEET_KEY="$2"; shift 2 ;;
    --unsigned) UNSIGNED=1; shift ;;
    --no-system) SYSTEM=0; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

# The box bundle holds the box's private key: it is unpacked into a private folder that goes away on every exit
# path, success or failure.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT INT TERM

src=""
if [ -n "$BOX" ]; then
  if [ -f "$BOX" ]; then
    tar -xzf "$BOX" -C "$WORK" --no-same-owner --no-same-permissions
    src="$(find "$WORK" -mindepth 1 -maxdepth 1 -type d | head -n1)"
  else
    src="$BOX"
  fi
  [ -n "$src" ] && [ -f "$src/box.toml" ] || { echo "$BOX is not a box bundle (no box.toml)" >&2; exit 1; }
  # Only plain files and folders: a symlink (box.toml -> /etc/shadow) would copy whatever it points at.
  odd="$(find "$src" -mindepth 1 ! -type f ! -type d -printf '%P\n' | head -n3)"
  [ -z "$odd" ] || { echo "box bundle refused: not a plain file: $odd" >&2; exit 1; }
fi

# The bundle's checksums, signed with the fleet key, are checked before anything from the bundle runs.
if [ -z "$FLEET_KEY" ]; then
  if [ -f "$ETC/model-signing.pub" ]; then FLEET_KEY="$ETC/model-signing.pub"
  elif [ -n "$src" ] && [ -f "$src/model-signing.pub" ]; then FLEET_KEY="$src/model-signing.pub"; fi
fi
if [ -f "$HERE/SHA256SUMS.sig" ] && [ -n "$FLEET_KEY" ]; then
  "$PY" -c 'import sys; sys.stdout.buffer.write(bytes.fromhex("302a300506032b6570032100" + open(sys.argv[1]).read().strip()))' \
    "$FLEET_KEY" > "$WORK/fleet.der"
  openssl pkeyutl -verify -pubin -keyform DER -inkey "$WORK/fleet.der" -rawin -in "$HERE/SHA256SUMS" \
    -sigfile "$HERE/SHA256SUMS.sig" >/dev/null \
    || { echo "bundle refused: SHA256SUMS is not signed by the fleet key $FLEET_KEY" >&2; exit 1; }
  echo "bundle signature verified (fleet key $(sha256sum < <("$PY" -c 'import sys; sys.stdout.buffer.write(bytes.fromhex(open(sys.argv[1]).read().strip()))' "$FLEET_KEY") | cut -c1-16))"
elif [ "$UNSIGNED" -eq 1 ]; then
  echo "warning: installing without a signature check (--unsigned)" >&2
else
  echo "bundle refused: no SHA256SUMS.sig, or no fleet key to check it with (--fleet-key FILE; --unsigned for a" \
       "development build)" >&2
  exit 1
fi
echo "checking the bundle's checksums"
(cd "$HERE" && sha256sum --quiet --strict -c SHA256SUMS)

"$PY" -c 'import sys, venv, ensurepip; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "python3 >= 3.11 with venv/ensurepip is required" >&2; exit 1; }

# Nothing but the bundle's wheels, each pinned to its sha256: no index, and no pip configuration of this machine.
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT || true
umask 022
mkdir -p "$PREFIX"
[ -x "$PREFIX/.venv/bin/python" ] || "$PY" -m venv "$PREFIX/.venv"
"$PREFIX/.venv/bin/python" -m pip install --quiet --no-index --find-links "$HERE/wheels" --require-hashes \
  --upgrade -r "$HERE/wheels/requirements.txt"
"$PREFIX/.venv/bin/wasla" --help >/dev/null
echo "installed: $PREFIX/.venv/bin/wasla ($("$PREFIX/.venv/bin/python" -c 'import importlib.metadata as m; print(m.version("wasla"))'))"

if [ "$SYSTEM" -eq 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "system install needs root (or use --no-system)" >&2; exit 1; }
  id wasla >/dev/null 2>&1 || useradd --system --home-dir /var/lib/wasla --no-create-home --shell /usr/sbin/nologin wasla
  for unit in "$HERE"/systemd/*.service; do
    sed "s#/opt/wasla/.venv#$PREFIX/.venv#g" "$unit" > "/etc/systemd/system/$(basename "$unit")"
  done
  # TCP tuned for the satellite uplink (BBR, no timestamps); applied now where the kernel allows, else at boot.
  if [ -f "$HERE/systemd/60-wasla-link.conf" ]; then
    modprobe tcp_bbr 2>/dev/null || true
    install -m 0644 "$HERE/systemd/60-wasla-link.conf" /etc/sysctl.d/60-wasla-link.conf
    sysctl -q -p /etc/sysctl.d/60-wasla-link.conf || echo "note: sysctl settings apply at the next boot" >&2
  fi
fi

if [ -n "$src" ]; then
  owner=()
  [ "$(id -u)" -eq 0 ] && owner=(-o root -g root)
  install -d -m 0755 "$ETC"
  install -d -m 0700 "${owner[@]}" "$ETC/credentials"
  install -m 0644 "$src/box.toml" "$src/ca.crt" "$src/model-signing.pub" "$ETC/"
  for f in "$src"/credentials/*; do
    install -m 0600 "${owner[@]}" "$f" "$ETC/credentials/"
  done
  if [ "$SYSTEM" -eq 1 ] && [ -f "$src/credentials/pseudonym.key" ]; then
    install -d /etc/systemd/system/wasla-box.service.d
    printf '[Service]\nLoadCredential=pseudonym.key:%s/credentials/pseudonym.key\n' "$ETC" \
      > /etc/systemd/system/wasla-box.service.d/pseudonym.conf
  fi
  echo "box $(sed -n 's/^id = "\(.*\)"/\1/p' "$ETC/box.toml" | head -n1) configured in $ETC"
fi
if [ "$SYSTEM" -eq 1 ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
echo "next: $PREFIX/.venv/bin/wasla --config $ETC/box.toml doctor && systemctl enable --now wasla-box"
