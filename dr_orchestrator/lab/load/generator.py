"""The load generator process: drives each service through the front door at a steady rate.

Run as ``python -m dr_orchestrator.lab.load.generator --ledger PATH --url SERVICE=URL ... [--rate R]``
(``dr lab load start`` does); SIGTERM or SIGINT stop it after committing the ledger.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from dr_orchestrator.lab.load.defaults import DEFAULT_RATE, DEFAULT_TIMEOUT
from dr_orchestrator.lab.load.ledger import (
    LedgerEntry,
    LedgerWriter,
    RunInfo,
    connect,
    record_run_start,
    record_run_stop,
    utc_now,
)
from dr_orchestrator.lab.load.workload import WORKLOADS, Workload, request_key


@dataclass(frozen=True)
class GeneratorSettings:
    ledger: Path
    urls: dict[str, str]  # service -> its front-door URL
    rate: float = DEFAULT_RATE
    timeout: float = DEFAULT_TIMEOUT


def outcome_of(response: httpx.Response, workload: Workload) -> str:
    return "ok" if response.status_code == workload.success_status else f"http {response.status_code}"


def error_outcome(error: Exception) -> str:
    detail = str(error).strip()
    return f"error: {type(error).__name__}" + (f": {detail}" if detail else "")


class ServiceDriver:
    """Sends one service's requests at ``rate`` per second from ``workers`` threads sharing one client.

    Slot k is due at start + k / rate and belongs to worker k mod workers, so a slow answer delays only
    that worker; a worker that falls behind skips its missed slots rather than bursting to catch up.
    """

    def __init__(
        self, workload: Workload, run_id: str, settings: GeneratorSettings, writer: LedgerWriter, stop: threading.Event
    ) -> None:
        self._start_mono = 0.0  # set by start(): all services share one schedule origin
        self._workload = workload
        self._run_id = run_id
        self._rate = settings.rate
        self._writer = writer
        self._stop = stop
        # The timeout bounds each phase (connect, read), so cover two timeouts' worth of slots.
        self._workers = max(1, math.ceil(settings.rate * settings.timeout * 2))
        self._client = httpx.Client(
            base_url=settings.urls[workload.service],
            timeout=settings.timeout,
            limits=httpx.Limits(max_connections=self._workers, max_keepalive_connections=self._workers),
        )
        self._threads = [
            threading.Thread(target=self._work, args=(index,), name=f"{workload.service}-{index}", daemon=True)
            for index in range(self._workers)
        ]

    def start(self, start_mono: float) -> None:
        self._start_mono = start_mono
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._client.close()

    def _work(self, index: int) -> None:
        for slot in itertools.count(index, self._workers):
            due = self._start_mono + slot / self._rate
            now = time.monotonic()
            if due < now - 1 / self._rate:
                continue  # missed while an earlier request of this worker was slow
            if self._stop.wait(max(0.0, due - now)):
                return
            self._send(slot)

    def _send(self, seq: int) -> None:
        key = request_key(self._workload, self._run_id, seq)
        sent_at, sent_mono = utc_now(), time.monotonic()
        status: int | None = None
        site: str | None = None
        try:
            response = self._workload.send(self._client, key, seq)
            status, site = response.status_code, response.headers.get("X-DR-Site")
            outcome = outcome_of(response, self._workload)
        except httpx.HTTPError as error:
            outcome = error_outcome(error)
        answered_mono, answered_at = time.monotonic(), utc_now()
        self._writer.add(
            LedgerEntry(
                self._run_id,
                self._workload.service,
                self._workload.operation,
                key,
                sent_at,
                answered_at,
                sent_mono,
                answered_mono,
                outcome,
                status,
                site,
            )
        )


def run(settings: GeneratorSettings) -> None:
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    connection = connect(settings.ledger)
    run_id = "ld" + uuid.uuid4().hex[:8]
    record_run_start(connection, RunInfo(run_id, os.getpid(), utc_now(), None, settings.rate, settings.timeout))
    writer = LedgerWriter(connection)
    writer.start()
    drivers = [ServiceDriver(workload, run_id, settings, writer, stop) for workload in WORKLOADS.values()]
    start_mono = time.monotonic()
    for driver in drivers:
        driver.start(start_mono)
    while not stop.wait(0.5):
        pass
    for driver in drivers:
        driver.join()
    writer.close()
    record_run_stop(connection, run_id)
    connection.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ledger", type=Path, required=True)
    parser.add_argument("--url", action="append", required=True, metavar="SERVICE=URL", help="once per service")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    args = parser.parse_args(argv)
    urls = dict(item.split("=", 1) for item in args.url)
    if set(urls) != set(WORKLOADS):
        parser.error(f"give --url for each of {', '.join(WORKLOADS)}")
    run(GeneratorSettings(args.ledger, urls, args.rate, args.timeout))


if __name__ == "__main__":
    main()
