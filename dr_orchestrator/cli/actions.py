"""`dr actions`: the actions a step can use, with their parameters."""

from __future__ import annotations

import json
from typing import Any

import click

from dr_orchestrator.cli.common import output_option


@click.command()
@output_option
def actions(output: str) -> None:
    """List the actions a step can use, with each parameter's type, default (or "required") and description."""
    from dr_orchestrator.actions import default_registry

    registry = default_registry()
    listing: dict[str, dict[str, dict[str, Any]]] = {}
    for name in registry.names():
        model = registry.get(name).Params
        listing[name] = {}
        for field, info in model.model_fields.items():
            entry: dict[str, Any] = {"type": type_name(info.annotation), "required": info.is_required()}
            if not info.is_required():
                entry["default"] = info.get_default(call_default_factory=True)
            entry["description"] = info.description or ""
            listing[name][info.alias or field] = entry
    if output == "json":
        click.echo(json.dumps(listing, indent=2, default=str))
        return
    for name, fields in listing.items():
        click.echo(name)
        for field, entry in fields.items():
            how = "required" if entry["required"] else f"default {entry['default']!r}"
            described = f": {entry['description']}" if entry["description"] else ""
            click.echo(f"    {field} ({entry['type']}, {how}){described}")


def type_name(annotation: Any) -> str:
    """A parameter's type as a runbook author reads it: ``str | None``, ``list[str]``, ``duration``."""
    import enum
    import types
    import typing

    from dr_orchestrator.model.durations import parse_duration

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        if any(getattr(meta, "func", None) is parse_duration for meta in args[1:]):
            return "duration"
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(arg) for arg in args))
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if annotation is type(None):
        return "None"
    if annotation is typing.Any:
        return "any"
    if origin is not None:
        inner = ", ".join("..." if arg is Ellipsis else type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", "")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(member.value) for member in annotation)
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))
