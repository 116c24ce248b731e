"""Wasla sync: the shared core (core/), the wire box and hub agree on (wire/), and the hub (hub/)."""
