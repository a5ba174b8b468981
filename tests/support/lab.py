"""What tests do to the lab's databases behind the orchestrator's back."""

from __future__ import annotations

import psycopg

from dr_orchestrator.lab.config import LabConfig


def set_read_only(config: LabConfig, site: str, service: str, read_only: bool) -> None:
    """What a fence (postgres.set_read_only) does to a primary: `service`'s, no other."""
    with psycopg.connect(config.dsn(site, service), autocommit=True) as connection:
        connection.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if read_only else 'off'}".encode())
        connection.execute("SELECT pg_reload_conf()")
