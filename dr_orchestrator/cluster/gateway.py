"""etcd through its HTTP gateway (etcd3gw), one client per endpoint, each request tried on every endpoint in turn.

etcd 3.4 serves its gRPC gateway at ``/v3/``: JSON bodies, keys and values base64. A request that cannot
reach a member (refused, timed out, the member has no raft leader: HTTP 503/500/504) moves on to the next
endpoint; the last endpoint that answered is tried first next time. When none answers, `EtcdUnavailable`
says so, naming each endpoint's error.

Retrying a write on another endpoint after a timeout may apply it twice (the first member may have
committed it before the answer was lost): callers make their writes safe to repeat (leadership compares
the leader key's value, so a repeated campaign recognises its own key).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

T = TypeVar("T")
API_PATH = "/v3/"  # etcd 3.4 and newer; fixed, so no version discovery round trip per client


class ClusterError(RuntimeError):
    """Something about the etcd cluster went wrong (one sentence, shown as is)."""


class EtcdUnavailable(ClusterError):
    """No etcd endpoint answered the request."""


# Errors after which another member may well answer: the request never got a decision from this one.
_TRY_NEXT = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError,
             etcd_errors.InternalServerError, requests.RequestException)


def encode(data: str | bytes) -> str:
    """etcd gateway form of a key or value (base64 of its UTF-8 bytes)."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def decode(data: str | None) -> bytes:
    return base64.b64decode(data or "")


def normalise_endpoint(endpoint: str) -> str:
    """``host:port`` or ``http://host:port`` -> ``http://host:port`` (no trailing slash)."""
    text = endpoint.strip().rstrip("/")
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
        raise ValueError(f"an etcd endpoint must look like http://HOST:PORT, got {endpoint!r}")
    return f"{parts.scheme}://{parts.netloc}"


def describe_error(error: BaseException) -> str:
    """A short reason: requests' messages repeat the URL and the pool's internals."""
    detail = " ".join(str(getattr(error, "detail_text", None) or error or type(error).__name__).split())
    if "timed out" in detail.lower():
        return "timed out"
    if "Connection refused" in detail or "Failed to establish a new connection" in detail:
        return "connection refused"
    return detail[:200]


class Gateway:
    """Requests to an etcd cluster through any of its members' HTTP gateways."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = 1.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [normalise_endpoint(endpoint) for endpoint in endpoints]
        self.timeout_s = timeout_s
        self._clients = [self._client(endpoint) for endpoint in self.endpoints]
        self._preferred = 0
        self._lock = threading.Lock()

    def _client(self, endpoint: str) -> Etcd3Client:
        parts = urlsplit(endpoint)
        assert parts.hostname is not None and parts.port is not None
        return Etcd3Client(host=parts.hostname, port=parts.port, protocol=parts.scheme, timeout=self.timeout_s,
                           api_path=API_PATH)

    def client(self, endpoint: str) -> Etcd3Client:
        return self._clients[self.endpoints.index(normalise_endpoint(endpoint))]

    def call(self, request: Callable[[Etcd3Client], T], what: str) -> T:
        """`request` on the preferred endpoint, then on each other one; `what` names it in errors."""
        with self._lock:
            first = self._preferred
        failures: list[str] = []
        for step in range(len(self._clients)):
            index = (first + step) % len(self._clients)
            try:
                result = request(self._clients[index])
            except _TRY_NEXT as error:
                failures.append(f"{self.endpoints[index]}: {describe_error(error)}")
                continue
            except etcd_errors.Etcd3Exception as error:
                raise ClusterError(f"etcd refused to {what} at {self.endpoints[index]}: "
                                   f"{describe_error(error)}") from error
            with self._lock:
                self._preferred = index
            return result
        raise EtcdUnavailable(f"could not {what}: no etcd endpoint answered ({'; '.join(failures)})")

    def post(self, path: str, payload: dict[str, Any], what: str) -> dict[str, Any]:
        """POST `payload` to the gateway's `path` (e.g. ``/lease/grant``) on the first endpoint that answers."""
        def request(client: Etcd3Client) -> dict[str, Any]:
            answer = client.post(client.get_url(path), json=payload)
            return answer if isinstance(answer, dict) else {}
        return self.call(request, what)

    def transaction(self, txn: dict[str, Any], what: str) -> dict[str, Any]:
        return self.call(lambda client: dict(client.transaction(txn)), what)

    def get(self, key: str, what: str) -> dict[str, Any] | None:
        """The key's KeyValue (gateway JSON: value still base64, revisions as strings) or None when absent."""
        answer = self.post("/kv/range", {"key": encode(key)}, what)
        kvs = answer.get("kvs") or []
        return dict(kvs[0]) if kvs else None
