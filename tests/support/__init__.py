"""Helpers shared by several test packages (private servers and the like)."""
