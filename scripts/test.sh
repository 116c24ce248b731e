#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "dev,train"
# Lint first (pyflakes rules and syntax errors, pyproject.toml [tool.ruff]): a second or two, and an undefined name
# in a rarely-run branch fails here rather than in the field.
.venv/bin/ruff check edge sync provisioning models scripts tests
# Type check of the shared core and the wire format ([tool.mypy] in pyproject.toml).
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
# The same code on the lowest versions pyproject.toml declares (its own virtualenv; a subset of the suites).
[ "$#" -gt 0 ] || bash scripts/test_floors.sh
