"""One of the lab's three financial services (trading, contract-signing, quotation) at one site.

Each keeps its own data: trading and contract-signing in their own PostgreSQL, quotation its price
cache in Redis. Run by the system's /usr/bin/python3 with Debian's python3-psycopg2 and python3-redis
(the lab copies this file into its directory so the postgres OS user can read it):

    python3 service_app.py --config SITE_DIR/site.json --service trading

Every response is JSON and carries `X-DR-Site: <site>`. `GET /health` answers 200 when ready, else
503: trading and contract-signing need a database that takes writes (not a standby, not a primary
set read-only), quotation a cache (master or replica) that answers. Its body says `db_role` (read-write, read-only,
unreachable), `writable`, `ready`, and `why` when not ready, e.g.
`{"db_role": "read-only", "writable": false, "ready": false, "why": "the database is a primary set
read-only (default_transaction_read_only): trading cannot write"}`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg2
import psycopg2.errors

WRITERS = {"trading", "contract-signing"}
SIDES = {"buy", "sell"}
MAX_BODY = 1 << 20


class Unavailable(Exception):
    """The database cannot serve this request now (read-only or unreachable): answer 503."""

    def __init__(self, db_role: str) -> None:
        super().__init__(db_role)
        self.db_role = db_role


class BadRequest(Exception):
    """The client sent something we cannot accept: answer 400 with the reason."""


class Database:
    """Connections to the site's database, kept between requests (a fresh one per request costs the
    server a backend process each time: most of an idle lab's CPU under the watch's 100 ms probes); at
    most MAX_CONNECTIONS open. A broken one is dropped with every idle one: the server restarted or went
    away, so its other sessions are gone too, and the retry gets a fresh connection."""

    MAX_CONNECTIONS = 32

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = {"host": settings["host"], "port": settings["port"], "dbname": settings["dbname"],
                          "user": settings["user"], "connect_timeout": 2,
                          "application_name": settings.get("application_name", "service")}
        self._idle: list[Any] = []
        self._open = 0
        self._lock = threading.Lock()

    def _take(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            if self._open >= self.MAX_CONNECTIONS:
                raise Unavailable("unreachable")
            self._open += 1
        try:
            return psycopg2.connect(**self._settings)
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def _give(self, connection: Any, broken: bool) -> None:
        with self._lock:
            if broken or connection.closed:
                dropped, self._idle = [connection, *self._idle], []
                self._open -= len(dropped)
            else:
                self._idle.append(connection)
                dropped = []
        for each in dropped:
            each.close()

    def run(self, work: Callable[[Any], Any]) -> Any:
        """Run `work(cursor)` in autocommit; retried once on a fresh connection when the old one broke."""
        for attempt in (1, 2):
            try:
                connection = self._take()
            except psycopg2.OperationalError:
                raise Unavailable("unreachable") from None
            broken = False
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    return work(cursor)
            except psycopg2.errors.ReadOnlySqlTransaction:
                raise Unavailable("read-only") from None
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                broken = True
                if attempt == 2:
                    raise Unavailable("unreachable") from None
            finally:
                self._give(connection, broken)
        raise Unavailable("unreachable")

    def role(self) -> tuple[str, str | None]:
        """``read-write``, ``read-only`` or ``unreachable``, and why it refuses writes (None when it takes them)."""
        try:
            in_recovery, read_only = self.run(lambda cursor: _one(
                cursor, "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'"))
        except Unavailable as exc:
            return exc.db_role, f"the database is {exc.db_role}"
        if in_recovery:
            return "read-only", "the database is a standby (in recovery)"
        if read_only:
            return "read-only", "the database is a primary set read-only (default_transaction_read_only)"
        return "read-write", None


def _one(cursor: Any, sql: str, args: tuple[Any, ...] = ()) -> Any:
    cursor.execute(sql, args)
    return cursor.fetchone()


class Cache:
    """Quotation's Redis at this site: quotes are hashes ``quote:SYMBOL`` (bid, ask, as_of)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import redis  # only quotation needs it

        self._errors = redis.RedisError
        self._client = redis.Redis(host=settings["host"], port=settings["port"], socket_timeout=2,
                                   socket_connect_timeout=2, decode_responses=True)

    def role(self) -> tuple[str, str | None]:
        try:
            role = self._client.info("replication").get("role")
        except self._errors:
            return "unreachable", "the cache is unreachable"
        if role != "master":
            return "read-only", "the cache is a replica"
        return "read-write", None

    def quote(self, symbol: str) -> dict[str, str]:
        try:
            found = self._client.hgetall(f"quote:{symbol}")
        except self._errors:
            raise Unavailable("unreachable") from None
        return {str(key): str(value) for key, value in found.items()}


class App:
    def __init__(self, service: str, site: str, store: Database | Cache) -> None:
        self.service = service
        self.site = site
        self.store = store

    @property
    def database(self) -> Database:
        assert isinstance(self.store, Database), f"{self.service} keeps no SQL database"
        return self.store

    @property
    def cache(self) -> Cache:
        assert isinstance(self.store, Cache), f"{self.service} keeps no cache"
        return self.store

    def health(self) -> tuple[int, dict[str, Any]]:
        role, refusal = self.store.role()
        writable = refusal is None
        ready = writable if self.service in WRITERS else role != "unreachable"
        body = {"service": self.service, "site": self.site, "db_role": role, "writable": writable, "ready": ready}
        if not ready:
            body["why"] = f"{refusal}: {self.service} {'cannot write' if self.service in WRITERS else 'cannot read'}"
        return (200 if ready else 503), body

    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/health":
            return self.health()
        route = (self.service, method, path.split("/")[1] if "/" in path else "")
        handlers: dict[tuple[str, str, str], Callable[[str, dict[str, Any] | None], tuple[int, dict[str, Any]]]] = {
            ("trading", "POST", "orders"): self.place_order,
            ("trading", "GET", "orders"): self.get_order,
            ("contract-signing", "POST", "contracts"): self.sign_contract,
            ("contract-signing", "GET", "contracts"): self.get_contract,
            ("quotation", "GET", "quotes"): self.get_quote,
        }
        handler = handlers.get(route)
        if handler is None:
            return 404, {"error": f"no route {method} {path} on {self.service}"}
        return handler(path, body)

    # --- trading -----------------------------------------------------------------------------------
    def place_order(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if path != "/orders":
            return 404, {"error": f"no route POST {path}"}
        order = _fields(body, {"client_order_id": str, "symbol": str, "side": str, "qty": int})
        if order["side"] not in SIDES or order["qty"] <= 0:
            raise BadRequest("side must be buy or sell and qty a positive integer")
        # The same client_order_id again (a client retrying) returns the order it already placed.
        order_id = self.database.run(lambda cursor: _one(
            cursor,
            "INSERT INTO orders (client_order_id, symbol, side, qty) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (client_order_id) DO UPDATE SET client_order_id = EXCLUDED.client_order_id "
            "RETURNING order_id",
            (order["client_order_id"], order["symbol"], order["side"], order["qty"]),
        )[0])
        return 201, {"order_id": order_id, "client_order_id": order["client_order_id"]}

    def get_order(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        client_order_id = _key(path, "orders")
        row = self.database.run(lambda cursor: _one(
            cursor, "SELECT order_id, client_order_id, symbol, side, qty, created_at FROM orders "
                    "WHERE client_order_id = %s", (client_order_id,)))
        if row is None:
            return 404, {"error": f"no order {client_order_id}"}
        keys = ("order_id", "client_order_id", "symbol", "side", "qty", "created_at")
        return 200, {**dict(zip(keys[:-1], row[:-1], strict=True)), "created_at": row[-1].isoformat()}

    # --- contract-signing --------------------------------------------------------------------------
    def sign_contract(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if path != "/contracts":
            return 404, {"error": f"no route POST {path}"}
        contract = _fields(body, {"contract_id": str, "body": str})
        digest = hashlib.sha256(contract["body"].encode()).hexdigest()
        stored = self.database.run(lambda cursor: _one(
            cursor,
            "INSERT INTO contracts (contract_id, body, sha256) VALUES (%s, %s, %s) "
            "ON CONFLICT (contract_id) DO UPDATE SET contract_id = EXCLUDED.contract_id RETURNING sha256",
            (contract["contract_id"], contract["body"], digest),
        )[0])
        return 201, {"contract_id": contract["contract_id"], "sha256": stored}

    def get_contract(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        contract_id = _key(path, "contracts")
        row = self.database.run(lambda cursor: _one(
            cursor, "SELECT contract_id, body, sha256, created_at FROM contracts WHERE contract_id = %s",
            (contract_id,)))
        if row is None:
            return 404, {"error": f"no contract {contract_id}"}
        return 200, {"contract_id": row[0], "body": row[1], "sha256": row[2], "created_at": row[3].isoformat()}

    # --- quotation ---------------------------------------------------------------------------------
    def get_quote(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        symbol = _key(path, "quotes").upper()
        quote = self.cache.quote(symbol)
        if not quote:
            return 404, {"error": f"no quote for {symbol}"}
        return 200, {"symbol": symbol, "bid": float(quote["bid"]), "ask": float(quote["ask"]),
                     "as_of": quote["as_of"]}


def _key(path: str, collection: str) -> str:
    match = re.fullmatch(rf"/{collection}/([^/]+)", path)
    if match is None:
        raise BadRequest(f"use /{collection}/<id>")
    return match.group(1)


def _fields(body: dict[str, Any] | None, wanted: dict[str, type]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object")
    values = {}
    for name, kind in wanted.items():
        value = body.get(name)
        if not isinstance(value, kind) or isinstance(value, bool) or value == "":
            raise BadRequest(f"field {name!r} must be a non-empty {kind.__name__}")
        values[name] = value
    return values


class Server(ThreadingHTTPServer):
    # A deeper accept queue than http.server's 5: on a busy machine the accepting thread may not run for a
    # while, and a full queue drops the front door's connection attempts (its health checks then fail).
    request_queue_size = 128


def make_handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # keep-alive replies otherwise wait ~40 ms for a delayed ACK

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            try:
                body = self._body() if method == "POST" else None
                status, payload = app.handle(method, self.path.split("?", 1)[0], body)
            except BadRequest as exc:
                status, payload = 400, {"error": str(exc)}
            except Unavailable as exc:
                status, payload = 503, {"error": f"database is {exc.db_role}", "db_role": exc.db_role}
            except psycopg2.Error as exc:
                status, payload = 500, {"error": str(exc).strip()}
            self._reply(status, payload)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise BadRequest("body too large")
            try:
                return json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                raise BadRequest("body is not JSON") from None

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-DR-Site", app.site)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return  # one line per request would fill the log under load

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="the site's site.json")
    parser.add_argument("--service", required=True)
    args = parser.parse_args()
    with open(args.config) as handle:
        settings = json.load(handle)
    if args.service not in settings["services"]:
        print(f"unknown service {args.service!r}", file=sys.stderr)
        return 2
    store = settings["stores"][args.service]
    app = App(args.service, settings["site"], Cache(store) if store["kind"] == "redis" else
              Database({**store, "application_name": f"{args.service}@{settings['site']}"}))
    server = Server((settings["address"], settings["services"][args.service]), make_handler(app))
    server.daemon_threads = True
    # SIGTERM (servicectl stop) ends serve_forever cleanly; shutdown must come from another thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"{args.service}@{settings['site']} listening on {settings['address']}:{settings['services'][args.service]}",
          flush=True)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
