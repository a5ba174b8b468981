"""Telling the service manager the node is ready: systemd's notify protocol (``Type=notify``).

A node is ready once its watch has judged a first round of observations (and it campaigns for leadership):
from then on, losing a site is seen by it. systemd, and the lab's `dr lab up --ha`, wait for that rather
than for the process to exist. The protocol is one datagram, ``READY=1``, to the unix socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket); without it there is nobody to tell."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify_ready() -> bool:
    """Send ``READY=1`` to ``$NOTIFY_SOCKET``; False when it is not set or nobody listens (never raises:
    a manager that stopped listening must not stop the node)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as channel:
            channel.sendto(b"READY=1", address)
    except OSError as exc:
        log.warning("could not tell the service manager the node is ready (%s): %s", address.lstrip("\0"), exc)
        return False
    return True
