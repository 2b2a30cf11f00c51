"""End-to-end tests: the real server in subprocesses, over the wire, under faults."""
