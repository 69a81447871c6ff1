"""The headrace command: the local stack, provisioning, workers, the edge, status and benchmarks."""

__version__ = "0.1.0"
