#!/usr/bin/python3
"""servicectl: start, stop or show the lab's services at this site, as systemctl would on a real host.

    servicectl start SERVICE...    idempotent; returns once each answers /health (any status)
    servicectl stop SERVICE...     SIGTERM, then SIGKILL after 5 s; fine when already stopped
    servicectl status SERVICE...   one line each; exit 0 when all run, 3 when one does not

SERVICE is trading, contract-signing, quotation, or all. The lab copies this file to
<lab>/<site>/bin/servicectl; it reads <lab>/<site>/site.json and keeps pidfiles in <lab>/<site>/run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BIN = Path(__file__).resolve().parent
SITE_DIR = BIN.parent
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
NOT_RUNNING = 3  # systemctl's exit code for an inactive unit


def settings() -> dict[str, Any]:
    with open(SITE_DIR / "site.json") as handle:
        loaded: dict[str, Any] = json.load(handle)
    return loaded


def pidfile(service: str) -> Path:
    return SITE_DIR / "run" / f"{service}.pid"


def app_command(service: str) -> list[str]:
    return [sys.executable, str(BIN / "service_app.py"), "--config", str(SITE_DIR / "site.json"), "--service", service]


def running_pid(service: str) -> int | None:
    """The service's pid when its pidfile names a live process running this very service."""
    try:
        pid = int(pidfile(service).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    expected = [part.encode() for part in app_command(service)[1:]]
    return pid if state != "Z" and cmdline[1:len(expected) + 1] == expected else None


def health(url: str, timeout: float = 2.0) -> tuple[int, dict[str, Any]] | None:
    """(status, body) from /health, whatever the status; None when nothing answers."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return None


def url_of(config: dict[str, Any], service: str) -> str:
    return f"http://{config['address']}:{config['services'][service]}"


def start(config: dict[str, Any], services: list[str]) -> int:
    started: dict[str, subprocess.Popen[bytes]] = {}
    for service in services:
        if running_pid(service) is not None:
            continue
        log = open(SITE_DIR / "log" / f"{service}.log", "ab")  # handed to the child, closed here after
        # A new session: the service outlives this command and the SSH session that ran it.
        process = subprocess.Popen(app_command(service), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                   start_new_session=True, close_fds=True)
        log.close()
        pidfile(service).write_text(f"{process.pid}\n")
        started[service] = process
    failed = 0
    deadline = time.monotonic() + START_TIMEOUT
    for service in services:
        spawned = started.get(service)
        while True:
            answer = health(url_of(config, service), timeout=1.0)
            if answer is not None:
                print(f"{service}: running pid {running_pid(service)}, health {answer[0]}")
                break
            if spawned is not None and spawned.poll() is not None:
                print(f"{service}: exited with {spawned.returncode} at start; {tail(service)}", file=sys.stderr)
                failed += 1
                break
            if time.monotonic() > deadline:
                print(f"{service}: no answer on {url_of(config, service)}/health after {START_TIMEOUT:.0f} s; "
                      f"{tail(service)}", file=sys.stderr)
                failed += 1
                break
            time.sleep(0.02)
    return 1 if failed else 0


def tail(service: str) -> str:
    try:
        lines = (SITE_DIR / "log" / f"{service}.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return "log: " + " | ".join(lines[-5:])


def stop(services: list[str]) -> int:
    pids = {service: pid for service in services if (pid := running_pid(service)) is not None}
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for service, pid in pids.items():
        while running_pid(service) == pid and time.monotonic() < deadline:
            time.sleep(0.02)
        if running_pid(service) == pid:
            os.kill(pid, signal.SIGKILL)
        print(f"{service}: stopped")
    for service in services:
        pidfile(service).unlink(missing_ok=True)
    return 0


def status(config: dict[str, Any], services: list[str]) -> int:
    code = 0
    for service in services:
        pid = running_pid(service)
        if pid is None:
            print(f"{service}: stopped")
            code = NOT_RUNNING
            continue
        answer = health(url_of(config, service))
        if answer is None:
            print(f"{service}: running pid {pid}, not answering")
        else:
            body = answer[1]
            print(f"{service}: running pid {pid}, health {answer[0]}, db {body.get('db_role')}, "
                  f"ready {str(body.get('ready')).lower()}")
    return code


def main(argv: list[str]) -> int:
    config = settings()
    known = list(config["services"])
    if len(argv) < 2 or argv[0] not in ("start", "stop", "status"):
        print(f"usage: servicectl start|stop|status SERVICE... (SERVICE: {', '.join(known)} or all)", file=sys.stderr)
        return 2
    services = known if argv[1:] == ["all"] else argv[1:]
    unknown = [service for service in services if service not in known]
    if unknown:
        print(f"unknown service {unknown[0]!r}; this site runs {', '.join(known)}", file=sys.stderr)
        return 2
    if argv[0] == "start":
        return start(config, services)
    if argv[0] == "stop":
        return stop(services)
    return status(config, services)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
