"""Real local receivers for notification tests: a webhook endpoint (http.server) and an SMTP server
(a small one on a socket, speaking enough RFC 5321 for smtplib: EHLO, AUTH PLAIN, MAIL, RCPT, DATA)."""

from __future__ import annotations

import base64
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support.waiting import wait_for

from dr_orchestrator.lab.scratch import free_port  # noqa: F401 - tests import it from here


@dataclass
class WebhookCall:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class WebhookReceiver:
    port: int
    calls: list[WebhookCall] = field(default_factory=list)
    fail_first: int = 0  # answer 503 to this many requests first
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/T0KEN"

    def wait_for(self, count: int, timeout: float = 20.0) -> list[WebhookCall]:
        return wait_for(lambda: len(self.delivered()) >= count and self.delivered(), timeout,
                          f"{count} webhook deliveries")

    def delivered(self) -> list[WebhookCall]:
        with self.lock:
            return [c for c in self.calls if c.status == 200]


def start_webhook_receiver() -> tuple[WebhookReceiver, Callable[[], None]]:
    receiver = WebhookReceiver(0)

    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with receiver.lock:
                status = 503 if receiver.fail_first > 0 else 200
                receiver.fail_first -= 1
                receiver.calls.append(WebhookCall(self.path, dict(self.headers), body, status))
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return receiver, stop


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: Message
    auth: str | None


@dataclass
class SmtpServer:
    port: int
    mails: list[Mail] = field(default_factory=list)
    fail_first: int = 0  # answer 421 (try again later) to this many connections first
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Mail]:
        def enough() -> list[Mail] | None:
            with self.lock:
                return list(self.mails) if len(self.mails) >= count else None

        return wait_for(enough, timeout, f"{count} mails")


def start_smtp_server() -> tuple[SmtpServer, Callable[[], None]]:
    smtp = SmtpServer(0)

    class Handler(socketserver.StreamRequestHandler):
        def reply(self, line: str) -> None:
            self.wfile.write(line.encode() + b"\r\n")
            self.wfile.flush()

        def handle(self) -> None:
            with smtp.lock:
                refuse = smtp.fail_first > 0
                smtp.fail_first -= 1
            if refuse:
                self.reply("421 try again later")
                return
            self.reply("220 test SMTP ready")
            sender, recipients, auth = "", [], None
            while line := self.rfile.readline():
                command = line.decode().rstrip("\r\n")
                verb = command.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    self.reply("250-test\r\n250-AUTH PLAIN\r\n250 8BITMIME")
                elif verb == "AUTH":
                    parts = command.split()
                    auth = base64.b64decode(parts[2]).decode() if len(parts) > 2 else None
                    self.reply("235 ok")
                elif verb == "MAIL":
                    sender = command.split(":", 1)[1].strip().strip("<>").split(">")[0]
                    self.reply("250 ok")
                elif verb == "RCPT":
                    recipients.append(command.split(":", 1)[1].strip().strip("<>"))
                    self.reply("250 ok")
                elif verb == "DATA":
                    self.reply("354 go on")
                    data = b""
                    while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                        data += chunk[1:] if chunk.startswith(b"..") else chunk
                    with smtp.lock:
                        smtp.mails.append(Mail(sender, recipients, message_from_bytes(data), auth))
                    self.reply("250 queued")
                elif verb == "QUIT":
                    self.reply("221 bye")
                    return
                else:
                    self.reply("250 ok")

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    smtp.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return smtp, stop

