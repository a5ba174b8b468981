"""A node tells its service manager (systemd's ``Type=notify``, or `dr lab up --ha`) when it is ready."""

from __future__ import annotations

import pytest

from dr_orchestrator.lab.ha import NodeReadiness
from dr_orchestrator.node.readiness import notify_ready


def test_ready_reaches_the_socket_the_manager_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    with NodeReadiness(["primary", "backup"]) as readiness:
        assert readiness.waiting(timeout=0) == ["primary", "backup"]
        monkeypatch.setenv("NOTIFY_SOCKET", readiness.address("backup"))
        assert notify_ready()
        assert readiness.waiting(timeout=5) == ["primary"]


def test_without_a_manager_or_with_one_gone_the_node_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify_ready()
    with NodeReadiness(["primary"]) as readiness:
        gone = readiness.address("primary")
    monkeypatch.setenv("NOTIFY_SOCKET", gone)  # closed: nobody listens there any more
    assert not notify_ready()
