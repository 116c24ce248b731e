"""Wasla clinic box: ingest, imaging, inference, triage, store, daemon and technician CLI."""
