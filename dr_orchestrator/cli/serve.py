"""`dr serve` and `dr tokens ...`: the HTTP API and its tokens; FastAPI and uvicorn are imported only
inside `dr serve`."""

from __future__ import annotations

import json

import click

from dr_orchestrator.cli.common import UserError, announce, database_of, log_format_of, output_option, session_factory


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--runbooks", "runbooks_dir", default="runbooks", show_default=True, type=click.Path(file_okay=False),
              help="runbooks the API may start (paths in requests are relative to it)")
@click.option("--inventories", "inventories_dir", default="inventories", show_default=True,
              type=click.Path(file_okay=False), help="inventories the API may use (paths relative to it)")
@click.option("--drills", "drills_dir", default="failover_tests", show_default=True,
              type=click.Path(file_okay=False), help="directory of drill files")
@click.option("-i", "--inventory", "inventory_path", type=click.Path(dir_okay=False),
              help="the inventory whose services and sites alerts name (/api/alerts/...) and /status lists")
@click.option("--alert-webhook-secret", metavar="REF",
              help="the key signing /api/alerts/webhook requests, by reference: env:NAME or file:PATH")
@click.option("--watch", "watching", is_flag=True,
              help="also run the watch (`dr watch run`) on the inventory given with -i, in this process")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, runbooks_dir: str, inventories_dir: str, drills_dir: str,
          inventory_path: str | None, alert_webhook_secret: str | None, watching: bool) -> None:
    """Serve the HTTP API (its OpenAPI spec at /openapi.json), /metrics and the dashboard until stopped.

    Every request needs an API token (`dr tokens create`): `Authorization: Bearer TOKEN`; the
    dashboard also takes it once from its login form and keeps it in an HttpOnly cookie.
    """
    import threading

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from dr_orchestrator.api.app import ApiSettings, create_app
    from dr_orchestrator.cli.watch import prepared_watch
    from dr_orchestrator.logs import log_to_terminal
    from dr_orchestrator.secrets import SecretError, read_reference

    session_factory(ctx)  # the schema must be current
    services: tuple[str, ...] = ()
    if inventory_path is not None:
        from dr_orchestrator.loading import load_inventory
        from dr_orchestrator.yamlsource import LoadError

        try:
            services = tuple(load_inventory(inventory_path)[0].services)
        except LoadError as exc:
            raise UserError("; ".join(str(problem) for problem in exc.problems)) from None
    if alert_webhook_secret is not None:
        try:
            read_reference(alert_webhook_secret)
        except SecretError as exc:
            raise UserError(f"--alert-webhook-secret: {exc}") from None
    settings = ApiSettings(database_url=database_of(ctx), runbooks_dir=runbooks_dir,
                           inventories_dir=inventories_dir, drills_dir=drills_dir, inventory=inventory_path,
                           status_services=services, alert_webhook_secret=alert_webhook_secret)
    if watching and inventory_path is None:
        raise UserError("--watch watches the inventory given with -i INVENTORY; give one")
    watcher = prepared_watch(ctx, inventory_path) if watching and inventory_path is not None else None
    log_format = log_format_of(ctx)
    log_to_terminal(log_format, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    announce(ctx, f"dr API on http://{host}:{port}/ (dashboard /dashboard, OpenAPI /openapi.json, metrics /metrics)")
    stop = threading.Event()
    watching_thread = threading.Thread(target=watcher.run, args=(stop,), name="watch") if watcher else None
    if watching_thread is not None:
        watching_thread.start()
    try:
        # uvicorn's access log prints query strings, and a dashboard login link carries a token: the
        # app logs requests itself, without them. In JSON, uvicorn configures no handler of its own:
        # its records reach the root's JSON handler.
        uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_level="info",
                    log_config=None if log_format == "json" else LOGGING_CONFIG)
    finally:  # uvicorn returns on SIGINT/SIGTERM: the watch stops with it (its runs end first)
        stop.set()
        if watching_thread is not None:
            watching_thread.join()


@click.group()
def tokens() -> None:
    """API tokens for `dr serve` (roles: compliance, engineer, admin; alerts)."""


@tokens.command("create")
@click.option("--name", required=True, help="who holds it: the actor the audit chain records")
@click.option("--role", required=True, type=click.Choice(["compliance", "engineer", "admin", "alerts"]),
              help="compliance: read evidence and reports; engineer: also start runs and drills, approve; "
                   "admin: also manage tokens; alerts: only post alerts (for Alertmanager), nothing else")
@click.option("--expires", metavar="DURATION", help="lifetime, e.g. 30d or 12h, or never (until revoked); "
              "default: 90d for engineer and admin, never for compliance and alerts")
@output_option
@click.pass_context
def tokens_create(ctx: click.Context, name: str, role: str, expires: str | None, output: str) -> None:
    """Create a token and print it once; only its SHA-256 is kept."""
    from dr_orchestrator.api.tokens import TokenError, create_token, describe, token_lifetime
    from dr_orchestrator.plans import default_actor

    try:
        lifetime = token_lifetime(role, expires)
    except ValueError as exc:
        raise UserError(f"--expires: {exc}") from None
    with session_factory(ctx)() as session, session.begin():
        try:
            row, token = create_token(session, name, role, default_actor(), lifetime)
        except TokenError as exc:
            raise UserError(str(exc)) from None
        shown = describe(row)
    if output == "json":
        click.echo(json.dumps(shown | {"token": token}, indent=2))
        return
    until = f", expires {shown['expires_at']}" if shown["expires_at"] else ""
    click.echo(f"token {shown['id']} for {shown['name']} ({shown['role']}{until}):")
    click.echo(token)
    click.echo("It is shown only now: keep it in a secret store.", err=True)


@tokens.command("list")
@output_option
@click.pass_context
def tokens_list(ctx: click.Context, output: str) -> None:
    """Every token with its role and state (never the token itself)."""
    from dr_orchestrator.api.tokens import list_tokens

    with session_factory(ctx)() as session:
        rows = list_tokens(session)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tokens")
    for row in rows:
        click.echo(f"{row['id']:>4}  {row['name']:<24} {row['role']:<10} {row['state']:<8} "
                   f"created {row['created_at'][:19]} by {row['created_by']}"
                   + (f", expires {row['expires_at'][:19]}" if row["expires_at"] else ""))


@tokens.command("revoke")
@click.argument("token_id", type=int, metavar="ID")
@click.pass_context
def tokens_revoke(ctx: click.Context, token_id: int) -> None:
    """Revoke a token at once: requests with it get 401 from then on."""
    from dr_orchestrator.api.tokens import TokenError, revoke_token
    from dr_orchestrator.plans import default_actor

    with session_factory(ctx)() as session, session.begin():
        try:
            row = revoke_token(session, token_id, default_actor())
        except TokenError as exc:
            raise UserError(str(exc)) from None
        name = row.name
    click.echo(f"token {token_id} ({name}) revoked")
