"""Leadership on etcd and fencing tokens: one orchestrator node at a time may act.

A node campaigns by granting itself a lease and creating the leader key, bound to that lease, in a
transaction that succeeds only while the key does not exist (``create_revision == 0``). The key's value
names the node and its lease. The winner keeps the lease alive from a thread (a refresh every ttl/3);
the others poll the key and campaign again once it is gone (resigned, or its lease expired).

Leadership is lost the moment etcd says the lease is gone, the leader key stops being ours, or the local
deadline of the lease passes: the send time of the last successful refresh plus the TTL etcd granted,
on the monotonic clock. etcd restarts its own countdown only when the refresh arrives, so the local
deadline always falls before etcd can expire the key and let another node lead: a leader cut off from
etcd stops acting before anyone else starts. A watchdog thread ends the term at that deadline even when
the keep-alive thread is stuck in a request. On loss the `lost` event is set and the `on_lost`
callbacks run; the ended term's token is never valid again (a later term gets a new one).

A fencing token (`FencingToken`) is the leader key's create revision together with the node and its
lease. `assert_current(token)` proves in an etcd transaction that the leader key still has that create
revision and value; `FenceCheck` wraps that for the engine (see its docstring for the contract).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dr_orchestrator.cluster.gateway import ClusterError, EtcdUnavailable, Gateway, decode, encode

log = logging.getLogger(__name__)

DEFAULT_KEY = "/dr/leader"
MIN_TTL_S = 2  # etcd's floor with the lab's raft timing; etcd may grant more than asked, never less


class FencingError(ClusterError):
    """This node may not act now: do not run the changing step, record the refusal (str(error))."""


class Deposed(FencingError):
    """The token is not current: its term ended, or etcd's leader key is another term's."""

    def __init__(self, node: str, token: FencingToken, leader: LeaderInfo | None, reason: str,
                 leader_known: bool = True) -> None:
        self.node = node
        self.token = token
        self.leader = leader  # None: nobody leads, or (leader_known False) etcd could not be asked
        self.reason = reason
        if leader is not None:
            now = f"{leader.node} leads now (fencing token {leader.revision}, lease {leader.lease_id:x})"
        else:
            now = "no node leads now" if leader_known else "who leads now is unknown (etcd unreachable)"
        super().__init__(f"node {node} is not the leader under fencing token {token}: {reason}; {now}")


class FenceUnverifiable(FencingError):
    """etcd could not be asked whether the token is current (all endpoints unreachable): do not act."""


class NotLeader(ClusterError):
    """A token was asked of a node that does not lead."""


@dataclass(frozen=True)
class FencingToken:
    """The leader key's create revision in etcd (grows with every new term), with the node and its lease."""

    node: str
    revision: int
    lease_id: int
    key: str
    value: str  # the leader key's exact value in this term

    def __str__(self) -> str:
        return f"{self.revision}@{self.node}/lease:{self.lease_id:x}"


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads according to etcd's leader key."""

    node: str
    lease_id: int
    revision: int  # the key's create revision: the leader's fencing token revision
    since: str | None  # when it was elected (UTC, ISO 8601), as it wrote it

    @classmethod
    def from_kv(cls, kv: dict[str, Any]) -> LeaderInfo:
        raw = decode(kv.get("value")).decode(errors="replace")
        try:
            value = json.loads(raw)
        except ValueError:
            value = {}
        node = value.get("node") if isinstance(value, dict) else None
        return cls(node=str(node) if node else raw, lease_id=int(kv.get("lease") or 0),
                   revision=int(kv.get("create_revision") or 0),
                   since=value.get("since") if isinstance(value, dict) else None)


@dataclass
class Term:
    """One period of leadership of this node, with monotonic times."""

    token: FencingToken
    elected_at: float  # when the creating transaction answered
    deadline: float  # send time of the last successful refresh + granted TTL
    ttl_s: int
    ended_at: float | None = None  # never after `deadline`: authority ends there at the latest
    reason: str | None = None
    lost: threading.Event = field(default_factory=threading.Event)

    @property
    def live(self) -> bool:
        return self.ended_at is None


def read_leader(gateway: Gateway, key: str = DEFAULT_KEY) -> LeaderInfo | None:
    """The current leader from etcd (any node may ask); raises EtcdUnavailable when no endpoint answers."""
    kv = gateway.get(key, "read the leader key")
    return LeaderInfo.from_kv(kv) if kv else None


class Leadership:
    """This node's part in the election on `key_prefix` (the leader key itself: one key per election)."""

    def __init__(self, endpoints: Sequence[str], node_name: str, ttl_s: int, key_prefix: str = DEFAULT_KEY, *,
                 request_timeout_s: float | None = None, poll_interval_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not node_name:
            raise ValueError("a node needs a name")
        if ttl_s < MIN_TTL_S:
            raise ValueError(f"the leader lease's TTL must be at least {MIN_TTL_S} s, got {ttl_s}")
        self.node = node_name
        self.ttl_s = int(ttl_s)
        self.key = key_prefix.rstrip("/") or DEFAULT_KEY
        self.poll_interval_s = poll_interval_s
        self.request_timeout_s = request_timeout_s if request_timeout_s is not None else min(1.0, ttl_s / 4)
        self.gateway = Gateway(endpoints, timeout_s=self.request_timeout_s)
        self.lost = threading.Event()  # set when a term ends; cleared when a new one starts
        self.last_error: str | None = None  # the latest etcd failure seen by the background threads
        self._clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._term: Term | None = None
        self._terms: list[Term] = []
        self._on_elected: list[Callable[[FencingToken], None]] = []
        self._on_lost: list[Callable[[FencingToken, str], None]] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- state ---------------------------------------------------------------------------------------

    def is_leader(self) -> bool:
        with self._lock:
            term = self._term
            return term is not None and term.live and self._clock() < term.deadline

    def token(self) -> FencingToken:
        """The current term's token; NotLeader when this node does not lead."""
        with self._lock:
            if not self.is_leader():
                raise NotLeader(f"node {self.node} is not the leader")
            assert self._term is not None
            return self._term.token

    def term(self) -> Term | None:
        """The current live term, if any."""
        with self._lock:
            return self._term if self.is_leader() else None

    def terms(self) -> list[Term]:
        """Every term of this node so far, oldest first (ended ones carry `ended_at` and `reason`)."""
        with self._lock:
            return list(self._terms)

    def current_leader(self) -> LeaderInfo | None:
        """Who leads according to etcd; raises EtcdUnavailable when no endpoint answers."""
        return read_leader(self.gateway, self.key)

    def on_elected(self, callback: Callable[[FencingToken], None]) -> None:
        self._on_elected.append(callback)

    def on_lost(self, callback: Callable[[FencingToken, str], None]) -> None:
        """`callback(token, reason)` runs (on a background thread) when a term ends, resignation included."""
        self._on_lost.append(callback)

    def wait_until_leader(self, timeout: float) -> bool:
        deadline = self._clock() + timeout
        with self._changed:
            while not self.is_leader():
                remaining = deadline - self._clock()
                if remaining <= 0 or self._stopping.is_set():
                    return False
                self._changed.wait(min(remaining, 0.1))
            return True

    # --- life cycle ----------------------------------------------------------------------------------

    def start(self) -> Leadership:
        """Campaign now and from then on in the background (keep-alive, watchdog, campaigning again)."""
        if self._threads:
            raise RuntimeError("this Leadership has been started already")
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._run, name=f"leadership-{self.node}", daemon=True),
                         threading.Thread(target=self._watchdog, name=f"leadership-watchdog-{self.node}",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, resign: bool = True) -> None:
        """Stop the threads; when leading, resign (revoke the lease: the key goes at once, another node
        may lead without waiting for the TTL). `resign=False` only stops acting (the key lives out its TTL)."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
        with self._lock:
            term = self._term
        if term is not None and term.live:
            self._end(term, "resigned" if resign else "stopped")
            if resign:
                self._revoke(term.token.lease_id)

    def __enter__(self) -> Leadership:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- campaigning ---------------------------------------------------------------------------------

    def campaign_once(self) -> FencingToken | None:
        """One attempt to become leader; the new term's token, or None when another node holds the key.
        Raises EtcdUnavailable when etcd cannot be reached."""
        with self._lock:
            if self.is_leader():
                assert self._term is not None
                return self._term.token
        sent = self._clock()
        grant = self.gateway.post("/lease/grant", {"TTL": self.ttl_s, "ID": 0}, "grant a leader lease")
        lease_id, granted = int(grant["ID"]), int(grant["TTL"])
        value = json.dumps({"node": self.node, "lease": f"{lease_id:x}", "since": datetime.now(UTC).isoformat()},
                           sort_keys=True)
        key = encode(self.key)
        txn = {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_put": {"key": key, "value": encode(value), "lease": lease_id}}],
            "failure": [{"request_range": {"key": key}}],
        }
        try:
            answer = self.gateway.transaction(txn, "create the leader key")
        except ClusterError:
            self._revoke(lease_id)
            raise
        if answer.get("succeeded"):
            revision = int(answer["header"]["revision"])
        else:
            kvs = (answer.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
            if kvs and decode(kvs[0].get("value")).decode(errors="replace") == value:
                revision = int(kvs[0]["create_revision"])  # a retry on another endpoint: the first one won
            else:
                self._revoke(lease_id)
                return None
        token = FencingToken(node=self.node, revision=revision, lease_id=lease_id, key=self.key, value=value)
        term = Term(token=token, elected_at=self._clock(), deadline=sent + granted, ttl_s=granted)
        with self._changed:
            if self._clock() >= term.deadline:  # the campaign itself outlasted the lease
                return None
            self._term = term
            self._terms.append(term)
            self.lost.clear()
            self._changed.notify_all()
        log.info("node %s leads with fencing token %s (lease TTL %d s)", self.node, token, granted)
        for callback in list(self._on_elected):
            self._call(callback, token)
        return token

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                term = self.term()
                if term is None:
                    self._follow()
                else:
                    self._keep_alive(term)
            except Exception as error:  # an answer of an unexpected shape: the watchdog still guards the term
                log.exception("node %s: leadership loop failed; going on", self.node)
                self.last_error = f"unexpected failure: {error!r}"
                self._stopping.wait(self.poll_interval_s)

    def _follow(self) -> None:
        """Campaign when the leader key is absent, else wait a poll interval."""
        try:
            if self.gateway.get(self.key, "read the leader key") is None:
                self.campaign_once()
            self.last_error = None
        except ClusterError as error:
            self.last_error = str(error)
        if not self.is_leader():
            self._stopping.wait(self.poll_interval_s)

    def _keep_alive(self, term: Term) -> None:
        """Refresh the lease every ttl/3 until the term ends; a failed refresh is retried until the deadline."""
        last_sent = term.deadline - term.ttl_s
        retry_s = min(0.2, term.ttl_s / 10)
        while not self._stopping.is_set() and term.live:
            if self._stopping.wait(max(0.0, last_sent + term.ttl_s / 3 - self._clock())):
                return
            while not self._stopping.is_set() and term.live:
                sent = self._clock()
                try:
                    ttl = self._refresh(term.token.lease_id)
                except ClusterError as error:
                    self.last_error = str(error)
                    self._stopping.wait(retry_s)
                    continue
                if ttl <= 0:
                    self._end(term, "etcd reports the leader lease expired")
                    break
                with self._changed:
                    if term.live:
                        term.deadline = max(term.deadline, sent + ttl)
                        self._changed.notify_all()
                self.last_error = None
                last_sent = sent
                self._check_key(term)
                break
        if not term.live and not self._stopping.is_set():
            self._revoke(term.token.lease_id)  # best effort: the other nodes need not wait for the TTL

    def _refresh(self, lease_id: int) -> int:
        """The lease's new TTL; -1 when etcd no longer knows it (expired or revoked)."""
        answer = self.gateway.post("/lease/keepalive", {"ID": lease_id}, "refresh the leader lease")
        if "result" not in answer:  # a streamed error ({"error": ...}): no verdict on the lease, retry
            raise ClusterError(f"etcd did not refresh the leader lease: {answer.get('error') or answer}")
        return int(answer["result"].get("TTL", -1))

    def _check_key(self, term: Term) -> None:
        """The leader key must still be this term's (an operator may have deleted it)."""
        try:
            kv = self.gateway.get(self.key, "read the leader key")
        except ClusterError as error:
            self.last_error = str(error)
            return
        if kv is None or int(kv.get("create_revision") or 0) != term.token.revision:
            self._end(term, "the leader key is gone or belongs to another term")

    def _watchdog(self) -> None:
        """End the term at its deadline, whatever the keep-alive thread is waiting for."""
        while not self._stopping.is_set():
            with self._changed:
                term = self._term
                if term is None or not term.live:
                    self._changed.wait(0.5)
                    continue
                remaining = term.deadline - self._clock()
                if remaining > 0:
                    self._changed.wait(remaining)
                    continue
            # outside the lock: the callbacks run in _end
            self._end(term, f"no lease refresh reached etcd within the lease's {term.ttl_s} s "
                            f"({self.last_error or 'no answer'})")

    def _end(self, term: Term, reason: str) -> None:
        with self._changed:
            if not term.live:
                return
            term.ended_at = min(self._clock(), term.deadline)
            term.reason = reason
            term.lost.set()
            if self._term is term:
                self._term = None
                self.lost.set()
            self._changed.notify_all()
        log.warning("node %s lost leadership (fencing token %s): %s", self.node, term.token, reason)
        for callback in list(self._on_lost):
            self._call(callback, term.token, reason)

    def _revoke(self, lease_id: int) -> None:
        try:
            self.gateway.post("/lease/revoke", {"ID": lease_id}, "revoke the leader lease")
        except ClusterError as error:  # it expires by itself; an unknown lease is gone already
            log.info("node %s could not revoke lease %x: %s", self.node, lease_id, error)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # a callback's bug must not stop leadership's threads
            log.exception("leadership callback %r failed", callback)

    # --- fencing -------------------------------------------------------------------------------------

    def assert_current(self, token: FencingToken) -> None:
        """Prove `token` is the leader's current one; raise Deposed when it is not, FenceUnverifiable when
        etcd cannot be asked. One etcd transaction (a linearizable read through raft)."""
        with self._lock:
            term = self._term
            live = term is not None and term.token == token and self.is_leader()
            ended = next((t for t in self._terms if t.token == token and not t.live), None)
        if not live:
            reason = f"this node's term under it ended ({ended.reason})" if ended else \
                "this node does not lead under it"
            try:
                leader, known = self.current_leader(), True
            except ClusterError:
                leader, known = None, False
            raise Deposed(self.node, token, leader, reason, leader_known=known)
        key = encode(token.key)
        txn = {
            "compare": [
                {"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": token.revision},
                {"key": key, "result": "EQUAL", "target": "VALUE", "value": encode(token.value)},
            ],
            "success": [],
            "failure": [{"request_range": {"key": key}}],
        }
        try:
            answer = self.gateway.transaction(txn, "check the fencing token")
        except ClusterError as error:
            raise FenceUnverifiable(f"node {self.node} cannot prove fencing token {token} is current: {error}") \
                from error
        if not answer.get("succeeded"):
            kvs = (answer.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
            leader = LeaderInfo.from_kv(kvs[0]) if kvs else None
            if term is not None:
                self._end(term, "etcd's leader key is no longer this term's")
            raise Deposed(self.node, token, leader, "etcd's leader key is another term's")

    def fence_check(self) -> FenceCheck:
        """A FenceCheck bound to the current term's token (NotLeader when this node does not lead)."""
        return FenceCheck(self, self.token())


class FenceCheck:
    """What the engine calls before every changing step.

    Contract:
    - Made once per run when the run starts (`leadership.fence_check()`), bound to that term's token: a
      run started under one term never continues under another, even a later term of the same node.
    - `check()` (or calling the object) returns the token when this node still leads under it, proven by an
      etcd transaction at that moment: record `str(token)` with the step, then act.
    - It raises a FencingError instead: `Deposed` (the term ended or another node leads; the message says
      which node, which token and who leads now) or `FenceUnverifiable` (etcd unreachable). Either way the
      step must not act; record the refusal with the error's message and stop the run.
    - Thread-safe; one etcd round trip per call (a few milliseconds on the lab's loopback).
    - A token proven current can still go stale while the step runs (a pause longer than the lease's
      remaining time): keep each changing action short, and call again before each one.
    """

    def __init__(self, leadership: Leadership, token: FencingToken) -> None:
        self.leadership = leadership
        self.token = token

    def check(self) -> FencingToken:
        self.leadership.assert_current(self.token)
        return self.token

    def __call__(self) -> FencingToken:
        return self.check()


def lease_ttl_remaining(gateway: Gateway, lease_id: int) -> tuple[int, int] | None:
    """(remaining, granted) seconds of a lease, or None when it has expired."""
    answer = gateway.post("/kv/lease/timetolive", {"ID": lease_id}, "read the leader lease's time to live")
    remaining = int(answer.get("TTL", -1))
    return (remaining, int(answer.get("grantedTTL", 0))) if remaining >= 0 else None


__all__ = ["DEFAULT_KEY", "Deposed", "EtcdUnavailable", "FenceCheck", "FenceUnverifiable", "FencingError",
           "FencingToken", "LeaderInfo", "Leadership", "NotLeader", "Term", "lease_ttl_remaining", "read_leader"]
