"""What the API answers when it refuses: one body for every refusal, and the statuses each route
declares in the OpenAPI spec (``refusals(401, 404, ...)``), each with that body and what it means;
and how its answers' moments are declared (``Timestamp``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

# A moment as the evidence writes it (isoformat, "+00:00"), declared as what it is.
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class ErrorBody(BaseModel):
    """Every refusal: one sentence, the status again, and for some the details."""

    # 403 adds `role` and `needed`; a plan refused adds `problems` (file, line, field, message, fix).
    model_config = ConfigDict(extra="allow")

    error: str = Field(description="what is wrong, in one sentence")
    status: int
    problems: list[dict[str, Any]] | None = Field(
        None, description="422: every problem, each with `where` (or file, line, field) and `message`")


MEANINGS = {
    401: "no token, or an unknown, expired or revoked one (`WWW-Authenticate: Bearer`)",
    403: "the token's role is too low for this (the body names the role held and the role needed)",
    404: "the run, drill, step, file or token named does not exist",
    409: "the request conflicts with the current state (a run holds the service, the step is not waiting, "
         "several runs start with that id prefix, ...)",
    413: "the body is larger than the route takes (the sentence says how large it may be)",
    422: "a value in the path, query or body is malformed or refused; `error` names the parameter",
    503: "the server cannot do this here (no pack signing key, no PDF renderer)",
}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may refuse with ``statuses``."""
    return {status: {"model": ErrorBody, "description": MEANINGS[status]} for status in statuses}
