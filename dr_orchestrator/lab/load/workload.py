"""What the load generator asks of each service through the front door, and what counts as success."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx

# The symbols the lab seeds into its quotes table (lab/postgres.py), so every quote read can succeed.
SYMBOLS = ("ACME", "GLOBEX", "INITECH", "EURUSD", "GBPUSD", "BUND10Y")

SendRequest = Callable[[httpx.Client, str, int], httpx.Response]


@dataclass(frozen=True)
class Workload:
    """One kind of request a service gets: the operation's name, how to send it, and what success is."""

    service: str
    operation: str
    success_status: int
    send: SendRequest
    # For writes: the table and column in the site's database that hold the acknowledged key.
    table: str | None = None
    key_column: str | None = None

    @property
    def is_write(self) -> bool:
        return self.table is not None


def _place_order(client: httpx.Client, key: str, seq: int) -> httpx.Response:
    body = {
        "client_order_id": key,
        "symbol": SYMBOLS[seq % len(SYMBOLS)],
        "side": "buy" if seq % 2 == 0 else "sell",
        "qty": 1 + seq % 10,
    }
    return client.post("/orders", json=body)


def _sign_contract(client: httpx.Client, key: str, seq: int) -> httpx.Response:
    return client.post("/contracts", json={"contract_id": key, "body": f"Contract {key}: load test agreement #{seq}"})


def _read_quote(client: httpx.Client, key: str, seq: int) -> httpx.Response:
    return client.get(f"/quotes/{key}")


WORKLOADS: dict[str, Workload] = {
    "trading": Workload("trading", "place_order", 201, _place_order, table="orders", key_column="client_order_id"),
    "contract-signing": Workload(
        "contract-signing", "sign_contract", 201, _sign_contract, table="contracts", key_column="contract_id"
    ),
    "quotation": Workload("quotation", "read_quote", 200, _read_quote),
}


def request_key(workload: Workload, run_id: str, seq: int) -> str:
    """Writes get a key unique to the run (so the database can be searched for them); reads name a symbol."""
    if workload.is_write:
        return f"{run_id}-{seq}"
    return SYMBOLS[seq % len(SYMBOLS)]
