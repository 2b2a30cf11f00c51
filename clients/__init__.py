"""Thin clients for optserve (HTTP, PyTorch adapter, federated worker)."""
