"""The long-running cluster node (`dr node run`): leadership, the watch, takeover (service.py), and the
HTTP API and drill scheduler it hosts (hosting.py)."""
