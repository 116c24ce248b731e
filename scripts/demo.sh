#!/usr/bin/env bash
# The main job, end to end on embedded defaults: install, then broker + box daemon + real studies sent with storescu.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "box,hub,fleet,samples"
exec .venv/bin/python scripts/demo.py "$@"
