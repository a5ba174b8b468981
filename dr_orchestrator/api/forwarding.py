"""The API on a cluster node (`dr node run`): only the leader acts. A follower serves reads from the
evidence database and forwards every request that changes something (POST, PUT, PATCH, DELETE under
/api/) to the leader's API, answering with the leader's response as it is (and ``X-DR-Forwarded-To``).

The follower checks the token first (it shares the evidence database): a request without a valid one
is refused at the door (401) and never forwarded; the leader checks it again, with the role, and audits
what it does. No leader known, or a leader that does not answer: 503 naming why. A forwarded request
carries ``X-DR-Forwarded-By``; a node that receives one and does not lead either answers 503 rather
than forwarding it again (no loop while leadership moves)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import httpx
from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from dr_orchestrator.api.auth import ANONYMOUS, SAFE_METHODS, ApiError, header_token, identify
from dr_orchestrator.api.tokens import Rejection
from dr_orchestrator.cluster.members import LeaderAddress, NoLeader
from dr_orchestrator.evidence.store import EvidenceFallback

FORWARDED_BY = "X-DR-Forwarded-By"  # the follower that forwarded the request
FORWARDED_TO = "X-DR-Forwarded-To"  # on the answer: the leader that carried it out
FORWARD_TIMEOUT_S = 30.0  # a run's start waits up to 30 s for its locks on the leader (launcher.START_S)
# What the leader needs of the request: the token, the body's type, the alert webhook's signature.
PASSED_ON = ("authorization", "content-type", "accept", "x-dr-signature", "x-dr-timestamp")
# Headers of the leader's answer that belong to its own connection, not to the answer.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"})


class ClusterRole(Protocol):
    """What the API asks of the node it runs in."""

    @property
    def host(self) -> str: ...  # the node's name: the host its runs record
    @property
    def fallback(self) -> EvidenceFallback: ...  # the node's local evidence journal
    def is_leader(self) -> bool: ...  # leads, and its takeover has settled
    def leader_api(self) -> LeaderAddress: ...  # raises NoLeader
    def fence_check(self) -> Callable[[], object]: ...  # raises (ClusterError) when this node does not lead


def changes_something(request: Request) -> bool:
    return request.method not in SAFE_METHODS and request.url.path.startswith("/api/")


async def forwarded(request: Request, role: ClusterRole) -> Response | None:
    """The leader's answer to a request a follower must not carry out itself; None when this node
    serves it (a read, or this node leads). Raises ApiError (401, 503) for the app's refusal."""
    if not changes_something(request) or role.is_leader():
        return None
    found = await run_in_threadpool(identify, request.app.state.sessions, header_token(request))
    if isinstance(found, Rejection):
        request.state.actor = found.name or ANONYMOUS
        raise ApiError(401, found.reason)
    request.state.actor = found.name
    sender = request.headers.get(FORWARDED_BY)
    if sender is not None:
        raise ApiError(503, f"node {role.host} does not lead: it got this request from node {sender} and does not "
                            "forward it again (leadership is moving); send it again")
    try:
        leader = await run_in_threadpool(role.leader_api)
    except NoLeader as exc:
        raise ApiError(503, str(exc)) from None
    if leader.node == role.host:
        raise ApiError(503, f"node {role.host} leads but has not finished taking over yet; send it again shortly")
    return await _forward(request, role.host, leader)


async def _forward(request: Request, host: str, leader: LeaderAddress) -> Response:
    headers = {name: value for name, value in request.headers.items() if name in PASSED_ON}
    headers[FORWARDED_BY] = host
    target = f"http://{leader.api}{request.scope.get('raw_path', request.url.path.encode()).decode('latin-1')}"
    if request.url.query:
        target += "?" + request.url.query
    try:
        async with httpx.AsyncClient(timeout=FORWARD_TIMEOUT_S) as client:
            answer = await client.request(request.method, target, content=await request.body(), headers=headers)
    except httpx.TimeoutException as exc:
        raise ApiError(503, f"leader {leader.node} at {leader.api} did not answer within {FORWARD_TIMEOUT_S:g} s "
                            f"({type(exc).__name__}): it may have carried the request out; check before sending "
                            "it again") from None
    except httpx.HTTPError as exc:
        raise ApiError(503, f"leader {leader.node} at {leader.api} did not answer: {exc or type(exc).__name__}") \
            from None
    kept = {name: value for name, value in answer.headers.items() if name.lower() not in HOP_BY_HOP}
    return Response(answer.content, status_code=answer.status_code, headers={**kept, FORWARDED_TO: leader.node})
