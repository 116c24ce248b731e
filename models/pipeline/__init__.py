"""Wasla model pipeline: split, train, export, calibrate, quantise, evaluate, package and adapt triage models."""
