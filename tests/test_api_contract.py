"""The API keeps its OpenAPI spec: schemathesis generates requests from /openapi.json (valid and
invalid ones, undeclared methods, missing tokens) and runs every check on each answer, as each role.

Bounded to stay under a minute: a few examples per operation, each sent with every role's token."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from api_support import INVENTORIES, RUNBOOKS, prepared, token
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS

from dr_orchestrator.api.app import ApiSettings, create_app
from dr_orchestrator.evidence.signing import generate_keypair

ROLES = ("compliance", "engineer", "admin")
# Every check schemathesis has for a single answer ("--checks all"); max_response_time needs a limit.
ALL_CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
              "response_schema_conformance", "response_headers_conformance", "positive_data_acceptance",
              "negative_data_rejection", "use_after_free", "ensure_resource_availability",
              "missing_required_header", "ignored_auth", "object_level_authorization", "unsupported_method",
              "allow_header_conformance")


class StandIn:
    """The ASGI app schemathesis calls: the spec is read at import, the test's app is set by a fixture."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


served = StandIn(create_app(ApiSettings(database_url="sqlite://")))  # only its spec is read
schema = schemathesis.openapi.from_asgi("/openapi.json", served)


# Prints an empty PDF at once: the PDF answers are checked without starting Chromium (test_api.py
# renders real ones, marker `browser`).
FAKE_CHROMIUM = """#!/bin/sh
for arg; do case "$arg" in --print-to-pdf=*) printf '%%PDF-1.4\\n' > "${arg#--print-to-pdf=}";; esac; done
"""


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("contract")
    url = prepared(f"sqlite:///{home / 'evidence.db'}")
    (home / "drills").mkdir()
    private, _public = generate_keypair(home / "keys")
    served.app = create_app(ApiSettings(database_url=url, runbooks_dir=str(RUNBOOKS),
                                        inventories_dir=str(INVENTORIES), drills_dir=str(home / "drills"),
                                        signing_key=f"file:{private}"))
    yield {role: token(url, f"contract-{role}", role) for role in ROLES}


@pytest.fixture(autouse=True)
def fake_chromium(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    browser = tmp_path / "chromium"
    browser.write_text(FAKE_CHROMIUM)
    browser.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


@schema.auth(refresh_interval=None)
class RoleToken:
    """Tells schemathesis the token is given, not generated (a negative case may still leave it out):
    each call then puts one role's token in it."""

    def get(self, case: Any, context: Any) -> str:
        return "a role's token"

    def set(self, case: Any, data: str, context: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


def keep_tokens_alive(case: Any, ids: set[int]) -> None:
    """A generated DELETE /api/tokens/{id} must not revoke the tokens this test calls with (the id may
    come as text: "01" is token 1 too)."""
    try:
        named = int(str((case.path_parameters or {}).get("token_id")).strip())
    except ValueError:
        return
    if named in ids:
        case.path_parameters["token_id"] = 2**31 - 1


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
@pytest.mark.slow
def test_every_answer_matches_the_spec_for_every_role(case: Any, tokens: dict[str, str]) -> None:
    checks = [CHECKS.get_one(name) for name in ALL_CHECKS]
    keep_tokens_alive(case, set(range(1, len(ROLES) + 1)))
    if "Authorization" not in (case.headers or {}):  # a case without a token: the answer is the same for all
        case.call_and_validate(checks=checks)
        return
    for role in ROLES:
        case.headers["Authorization"] = f"Bearer {tokens[role]}"
        case.call_and_validate(checks=checks)


def test_the_tokens_it_sends_stand_for_their_roles(tokens: dict[str, str]) -> None:
    client = TestClient(served.app)
    answers = {role: client.get("/api/tokens", headers={"Authorization": f"Bearer {tokens[role]}"}).status_code
               for role in ROLES}
    assert answers == {"compliance": 403, "engineer": 403, "admin": 200}
