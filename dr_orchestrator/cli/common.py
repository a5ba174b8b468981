"""What the modules of the `dr` command share: a user's mistake (UserError, exit code 2), the exit
codes, the output and runbook options, the evidence database's sessions (interrupted runs swept),
a service's news to its operator, and the guard every run and resume goes through.

It imports nothing of the package; heavy imports stay inside the functions."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

USER_ERROR = 2
TAMPERED = 1
# `dr run` and `dr resume` exit with this when another live run holds a service or site of the plan:
# nothing ran (1 would say the run failed, 2 that the input was wrong).
LOCKED = 3


class UserError(click.ClickException):
    """A mistake of the user's: one sentence, exit code 2, no traceback (a JSON record with --log-format
    json)."""

    exit_code = USER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.as_log = logs_json_now()  # the context is gone by the time click shows the error

    def show(self, file: Any = None) -> None:
        if self.as_log:
            tell(self.format_message(), as_log=True)
        else:
            super().show(file)


def logs_json_now() -> bool:
    """Whether the command running now was given --log-format json (or $DR_LOG_FORMAT)."""
    context = click.get_current_context(silent=True)
    return context is not None and log_format_of(context) == "json"


def tell(text: str, as_log: bool | None = None, level: str = "ERROR", data: dict[str, Any] | None = None) -> None:
    """``text`` on stderr: a line, or with JSON logs (``as_log``, by default as the command was told) a JSON
    record of ``level`` (with ``data``)."""
    if not (logs_json_now() if as_log is None else as_log):
        click.echo(text, err=True)
        return
    import logging

    from dr_orchestrator.logs import JsonFormatter

    record = logging.makeLogRecord({"name": "dr_orchestrator.cli", "levelname": level,
                                    "levelno": logging.getLevelName(level), "msg": text, "data": data})
    click.echo(JsonFormatter().format(record), err=True)


def fail_with_problems(problems: list[Any], output: str) -> NoReturn:
    if output == "json":
        click.echo(json.dumps({"ok": False, "problems": [p.as_dict() for p in problems]}, indent=2))
    elif logs_json_now():
        for problem in problems:
            tell(str(problem), as_log=True, data=problem.as_dict())
    else:
        for problem in problems:
            click.echo(str(problem), err=True)
        warnings = sum(1 for p in problems if not getattr(p, "is_error", True))
        also = f" and {warnings} warning(s)" if warnings else ""
        click.echo(f"{len(problems) - warnings} problem(s){also} found.", err=True)
    sys.exit(USER_ERROR)


def print_warning(problem: Any) -> None:
    tell(str(problem), level="WARNING")


def parse_time(value: str | None, name: str, zone_required: bool = True) -> datetime | None:
    """An ISO-8601 time in UTC. Without ``zone_required`` a date (its midnight) or a time without a zone is
    taken in UTC, as the API takes a date."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        such_as = "2026-11-28T03:00:00Z" if zone_required else "2026-11-28T03:00:00Z or a date such as 2026-11-28"
        raise UserError(f"{name} {value!r} is not an ISO-8601 time such as {such_as}") from None
    if moment.tzinfo is None:
        if zone_required:
            raise UserError(f"{name} {value!r} has no time zone; add Z or +08:00")
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


output_option = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                             help="text for people, json for scripts")
runbook_arguments = [
    click.argument("runbook", type=click.Path(dir_okay=False)),
    click.option("--inventory", "-i", required=True, type=click.Path(dir_okay=False), help="inventory YAML"),
    click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="runbook parameter"),
]



def with_runbook_arguments(function: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed(runbook_arguments):
        function = decorator(function)
    return function


def log_format_of(ctx: click.Context) -> str:
    root = ctx.find_root().obj
    return str(root.get("log_format", "text")) if root else "text"


def announce(ctx: click.Context, text: str) -> None:
    """A service's news to its operator: a line on stdout, or in JSON log format a log record, so that
    a log collector reads nothing but JSON."""
    if log_format_of(ctx) == "json":
        import logging

        logging.getLogger("dr_orchestrator.cli").info(text)
    else:
        click.echo(text)
        sys.stdout.flush()


def database_of(ctx: click.Context) -> str | None:
    database = ctx.find_root().obj.get("database") if ctx.find_root().obj else None
    from dr_orchestrator import secrets

    if secrets.is_reference(database):  # --db / $DR_DATABASE_URL as env:NAME or file:/path
        try:
            return secrets.resolve(database)
        except secrets.SecretError as exc:
            raise UserError(f"evidence database: {exc}") from None
    return database


def session_factory(ctx: click.Context) -> Any:
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url, session_factory_for

    url = database_url(database_of(ctx))
    problem = migrate.schema_problem(url)
    if problem:
        raise UserError(problem)
    factory = session_factory_for(url)
    sweep(factory)  # runs whose process died are marked interrupted, never left running
    return factory


SWEEP_LOCK_TIMEOUT_S = 5.0
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL: lock_timeout expired


def sweep(sessions: Any) -> None:
    """Mark runs whose process died ``interrupted`` and say so; called whenever `dr` opens the evidence.
    Another writer holding the evidence chain longer than ``SWEEP_LOCK_TIMEOUT_S`` (one cut off in the
    middle of a transaction, until the server drops it) only skips the sweep: the command goes on."""
    import socket

    from sqlalchemy.exc import OperationalError

    from dr_orchestrator.evidence.liveness import sweep_interrupted

    try:
        swept = sweep_interrupted(sessions, socket.gethostname(), lock_timeout_s=SWEEP_LOCK_TIMEOUT_S)
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        tell(f"interrupted runs not checked: another writer held the evidence chain for {SWEEP_LOCK_TIMEOUT_S:g} s",
             level="WARNING")
        return
    for run_id in swept:
        tell(f"run {run_id} was interrupted (its orchestrator process is gone): see `dr runs show {run_id}`, "
             f"then `dr resume {run_id}`", level="WARNING")


def run_guarded(sessions: Any, plan: Any, observers: list[Any], **options: Any) -> Any:
    """Run (or resume) ``plan`` through the one run composition (``runs.execute``), SIGTERM as Ctrl-C;
    exit LOCKED when another run holds one of its locks."""
    from dr_orchestrator.runs.execute import LockHeld, execute

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return execute(sessions, plan, observers=observers, **options)
    except LockHeld as exc:
        tell(f"refused: {exc}")
        sys.exit(LOCKED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_until_stopped(service: Callable[[threading.Event], None]) -> None:
    """Run a resident service (``service(stop)``) until SIGTERM or Ctrl-C sets its stop event."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        service(stop)
    except KeyboardInterrupt:
        stop.set()


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def existing_run_id(sessions: Any, run_id: str) -> str:
    from dr_orchestrator.evidence import queries

    with sessions() as session:
        try:
            found = queries.find_run(session, run_id)
        except queries.AmbiguousRunId as exc:
            raise UserError(str(exc)) from None
    if found is None:
        raise UserError(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
    return str(found.id)


def logs_as_json(ctx: click.Context) -> bool:
    """With --log-format json a command that runs things logs JSON records on stderr (the engine's carry
    run and step ids) in place of its live progress and tables, so that a collector reads only JSON."""
    if log_format_of(ctx) != "json":
        return False
    from dr_orchestrator.logs import log_to_terminal

    log_to_terminal("json", "%(message)s")
    return True


def print_run_summary(sessions: Any, run_id: str, as_log: bool = False) -> None:
    """The run's state and each service's RTO and RPO against its targets: a table, or (``as_log``) a
    log record per service with the figures as its data."""
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_results

    with sessions() as session:
        detail = queries.run_detail(session, run_id)
    if not as_log:
        print_results(detail)
        return
    import logging

    from dr_orchestrator.evidence.auditor import FIGURE_FIELDS
    from dr_orchestrator.progress import figure_text

    log = logging.getLogger("dr_orchestrator.cli")
    if detail is None:
        log.error("run %s is not in the evidence database", run_id, extra={"run_id": run_id})
        return
    run = detail["run"]
    ids = {"run_id": run_id, "incident_id": run.get("incident_id")}
    for row in detail.get("results") or []:
        figures = {name: row.get(name) for name in ("service", *FIGURE_FIELDS, "rto_method", "rpo_method")}
        log.info("run %s: %s RTO %s, RPO %s", run_id, row["service"],
                 figure_text(row.get("rto_s"), row.get("rto_target_s"), row.get("rto_met")),
                 figure_text(row.get("rpo_s"), row.get("rpo_target_s"), row.get("rpo_met")),
                 extra={**ids, "data": figures})
    log.info("run %s %s", run_id, run["state"], extra={**ids, "data": {"state": run["state"], "kind": run["kind"],
                                                                       "runbook": run["runbook_name"]}})


def write_output(content: str | bytes, out: str | None) -> None:
    """To the file ``out``, else to stdout (binary content needs a file)."""
    if out:
        from pathlib import Path

        try:
            if isinstance(content, bytes):
                Path(out).write_bytes(content)
            else:
                Path(out).write_text(content, encoding="utf-8", newline="")
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror}") from None
    elif isinstance(content, bytes):
        raise UserError("this output is binary: give --out FILE")
    else:
        click.echo(content, nl=False)
