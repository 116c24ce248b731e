#!/usr/bin/env bash
# The declared minimum versions, installed and tested: every direct dependency at the lowest version pyproject.toml
# allows (uv's lowest-direct resolution), in a virtualenv of its own (.venv-floor), then the suites that exercise
# each of them. A floor that does not really work (sqlite-utils 3.x committing inside the store's transaction,
# highdicom before 0.28, typer before 0.16 on today's Click) fails here, not on a box installed from an old mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/uv ] || .venv/bin/python -m pip install -q "uv>=0.4" 2>&1 | grep -v -E "^WARNING: Location" || true
[ -x .venv-floor/bin/python ] || python3 -m venv .venv-floor
.venv/bin/uv pip install --python .venv-floor/bin/python --resolution lowest-direct -q -e ".[box,hub,test,samples]"
.venv/bin/uv pip list --python .venv-floor/bin/python 2>/dev/null | grep -i -E \
  "^(numpy|pydicom|paho-mqtt|prometheus-client|msgspec|typer|imagecodecs|onnxruntime|openvino|opencv-python-headless|pynetdicom|sqlite-utils|highdicom|psycopg|flask) " \
  | tr -s ' ' | paste -sd ',' | sed 's/^/floors: /'
# store (sqlite-utils), wire and codecs (paho, pydicom, imagecodecs, pylibjpeg, pyjpegls), inference (onnxruntime,
# openvino, opencv), results (highdicom), DICOM in/out (pynetdicom), CLIs (typer, rich), pseudonyms
# (dicom-anonymizer), hub (psycopg, flask, waitress), receivers and partitions (paho against a real Mosquitto).
exec .venv-floor/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_store.py tests/test_sync_protocol.py tests/test_codecs.py tests/test_models_and_inference.py \
  tests/test_imaging.py tests/test_preprocess.py tests/test_results_dicom.py tests/test_sr_supersession.py \
  tests/test_scp.py tests/test_ingest.py tests/test_cli.py tests/test_cli_languages.py tests/test_report.py \
  tests/test_pseudonym_table.py tests/test_sync_transfer.py tests/test_hub_partitions.py tests/test_hub_store_pg.py tests/test_hub_store_pg_parity.py \
  tests/test_web_worklist.py tests/test_config.py tests/test_metrics.py
