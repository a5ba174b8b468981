"""haproxy.set_active and haproxy.state against the lab's real HAProxy: the admin socket and real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from actionctx import Harness, lab_inventory

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionError
from dr_orchestrator.actions.haproxy import SetActive, State
from dr_orchestrator.lab import Lab

pytestmark = pytest.mark.lab


@pytest.fixture
def harness(lab: Lab) -> Iterator[Harness]:
    harness = Harness(lab_inventory(lab))
    try:
        yield harness
    finally:
        # Leave the shared lab as found: every backend on the primary site.
        act(harness, SetActive, site="primary", backends=list(harness.inventory.vars["front_door"]["backends"]))
        harness.close()


def act(harness: Harness, action: type[Action[Any]], service: str | None = None, **params: Any) -> dict[str, Any]:
    return action().run(action.Params.model_validate(params), harness.ctx(10, service=service)).output


def site_behind_front_door(lab: Lab, service: str) -> tuple[int, str | None]:
    with httpx.Client() as client:
        response = client.get(lab.config.frontend_url(service) + "/health", timeout=2)
    return response.status_code, response.headers.get("X-DR-Site")


def test_switches_a_backend_to_the_backup_and_back_verified_by_socket_and_http(harness: Harness, lab: Lab) -> None:
    assert site_behind_front_door(lab, "quotation") == (200, "primary")

    switched = act(harness, SetActive, service="quotation", site="backup")

    assert switched["previous_site"] == "primary"
    assert switched["before"]["quotation"]["backup"]["admin"] == "maint"
    assert switched["after"]["quotation"] == {
        "primary": {**switched["after"]["quotation"]["primary"], "admin": "maint"},
        "backup": {**switched["after"]["quotation"]["backup"], "admin": "ready", "operational": "up"},
    }
    assert switched["switch_s"] < 0.5
    print(f"haproxy switch: {switched['switch_s'] * 1000:.1f} ms")
    assert site_behind_front_door(lab, "quotation") == (200, "backup")
    assert site_behind_front_door(lab, "trading") == (200, "primary")  # other backends untouched
    assert act(harness, State, backends=["quotation"], expect_site="backup")["backends"]["quotation"][
        "active_sites"
    ] == ["backup"]

    # The rollback: the same action with the previous site.
    back = act(harness, SetActive, service="quotation", site=switched["previous_site"])
    assert back["previous_site"] == "backup"
    assert site_behind_front_door(lab, "quotation") == (200, "primary")


def test_several_backends_switch_in_one_step(harness: Harness, lab: Lab) -> None:
    output = act(harness, SetActive, site="backup", backends=["trading", "quotation"])

    assert output["previous_sites"] == {"trading": "primary", "quotation": "primary"}
    assert {name: state["backup"]["admin"] for name, state in output["after"].items()} == {
        "trading": "ready",
        "quotation": "ready",
    }
    # Quotation answers from its backup at once (it reads the standby); trading's backup cannot
    # write to a standby, so HAProxy's own check soon marks it down: only the admin state is asserted.
    assert site_behind_front_door(lab, "quotation") == (200, "backup")
    assert site_behind_front_door(lab, "contract-signing") == (200, "primary")


def test_state_checks_where_the_traffic_goes(harness: Harness) -> None:
    everything = act(harness, State)["backends"]
    assert {name: entry["active_sites"] for name, entry in everything.items()} == {
        "trading": ["primary"],
        "contract-signing": ["primary"],
        "quotation": ["primary"],
    }
    with pytest.raises(ActionError, match="does not send traffic to backup only: trading goes to primary"):
        act(harness, State, service="trading", expect_site="backup")


def test_mistakes_are_refused_before_anything_changes(harness: Harness, lab: Lab) -> None:
    with pytest.raises(ActionError, match="has no server for site 'elsewhere'"):
        act(harness, SetActive, site="elsewhere", backends=["trading"])
    with pytest.raises(ActionError, match="backend 'billing' is not in the front door's backends"):
        act(harness, SetActive, site="backup", backends=["billing"])
    with pytest.raises(ActionError, match="say which backends"):
        act(harness, SetActive, site="backup")
    assert site_behind_front_door(lab, "trading") == (200, "primary")


def test_registered_with_a_site_reference() -> None:
    registry = default_registry()
    assert registry.get("haproxy.set_active") is SetActive and registry.get("haproxy.state") is State
    assert SetActive.Params.model_fields["site"].json_schema_extra == {"refers_to": "site"}
