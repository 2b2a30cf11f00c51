"""Schemathesis against a real `optserve serve` process, driven by `openapi.yaml`."""
