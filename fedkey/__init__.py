"""fedkey: a personalized federated keyboard (orchestration: config, CLI, pipeline)."""

__version__ = "0.1.0"
