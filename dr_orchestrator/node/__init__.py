"""The long-running cluster node (`dr node run`): leadership, the watch, takeover (service.py)."""
