"""Drills: rehearsals of disasters from ``failover_tests/*.yml`` (load, run, judge, notify)."""
