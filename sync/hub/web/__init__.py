"""The hub's web worklist for radiologists (sync/hub/web/app.py)."""
