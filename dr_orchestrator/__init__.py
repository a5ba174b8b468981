"""dr-orchestrator: disaster-recovery runbooks, measured and proven by evidence."""

__version__ = "0.1.0"
