"""The front door: HAProxy on 127.0.0.1, one frontend and backend per service, switched at runtime.

Each backend has two servers, `primary` and `backup`. The inactive one sits in maint and there is
no `backup` keyword: nothing fails over by itself, the orchestrator switches through the admin socket.
"""

from __future__ import annotations

import socket
import subprocess

from dr_orchestrator.lab.config import FRONT_DOOR_ADDRESS, SERVICES, SITES, LabConfig
from dr_orchestrator.lab.system import LabSetupError, run

HAPROXY = "/usr/sbin/haproxy"


def render(config: LabConfig) -> str:
    lines = [
        "# Written by `dr lab up`; runtime changes go through the admin socket, not this file.",
        "global",
        f"    stats socket {config.admin_socket} mode 600 level admin",
        "    stats timeout 30s",
        "    maxconn 4000",
        "",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        # A refused connection is retried once after a turn-around of min(timeout connect, 1 s), on
        # another usable server (redispatch): a request caught by a switch is served by the new site
        # within a fifth of a second instead of hanging a second and failing. Loopback connects
        # complete in the kernel (the services keep a deep accept queue), so 200 ms is slack enough
        # for a busy machine; it also bounds the health checks' connect.
        "    retries 1",
        "    option redispatch",
        "    timeout connect 200ms",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 10s",
        "",
    ]
    for service in SERVICES:
        lines += [
            f"frontend {service}",
            f"    bind {FRONT_DOOR_ADDRESS}:{config.frontend_port(service)}",
            f"    default_backend {service}",
            "",
            f"backend {service}",
            "    option httpchk GET /health",
            "    http-check expect status 200",
        ]
        for site in SITES:
            state = "" if site == "primary" else " disabled"  # disabled = starts in maint
            lines.append(f"    server {site} {config.address(site)}:{config.service_port(service)} "
                         f"check inter 1s fall 2 rise 1{state}")
        lines.append("")
    return "\n".join(lines)


def marker(config: LabConfig) -> str:
    return f"-f {config.haproxy_cfg}"


def start(config: LabConfig) -> None:
    config.haproxy_dir.mkdir(mode=0o755, exist_ok=True)
    config.haproxy_cfg.write_text(render(config))
    run([HAPROXY, "-c", "-q", "-f", str(config.haproxy_cfg)])
    result = subprocess.run([HAPROXY, "-f", str(config.haproxy_cfg), "-D", "-p", str(config.haproxy_pidfile)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            timeout=20)
    if result.returncode != 0:
        raise LabSetupError(f"HAProxy did not start: {result.stderr.strip()[-400:]}")


def command(config: LabConfig, line: str, timeout: float = 2.0) -> str:
    """One runtime API command over the admin socket; returns HAProxy's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(config.admin_socket))
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def server_states(config: LabConfig) -> dict[str, dict[str, str]]:
    """Per backend, per server, HAProxy's status column: UP, DOWN, MAINT, DRAIN..."""
    states: dict[str, dict[str, str]] = {}
    for line in command(config, "show stat").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        fields = line.split(",")
        backend, server, status = fields[0], fields[1], fields[17]
        if backend in SERVICES and server in SITES:
            states.setdefault(backend, {})[server] = status
    return states
