"""Ground truth from a ledger: client-visible outage windows and acknowledged writes that went missing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from dr_orchestrator.lab.load.ledger import LedgerEntry


@dataclass(frozen=True)
class OutageWindow:
    """From the last success before a run of failures to the first success after it.

    Requests are taken in the order they were sent, so a request already in flight when the service
    recovered (answered late, with a timeout) belongs to the outage it was sent in instead of opening a
    new one. Times are answer times (ISO UTC); the duration comes from the monotonic clock. ``start`` is
    None when the ledger holds no success before the failures, ``end`` is None while they go on.
    """

    start: str | None
    end: str | None
    duration_s: float | None
    site_before: str | None
    site_after: str | None
    failed_requests: int
    first_failure_at: str
    last_failure_at: str

    @property
    def ongoing(self) -> bool:
        return self.end is None


@dataclass(frozen=True)
class MissingWrites:
    """Acknowledged writes (success answers) whose key is absent from the database of ``checked_site``."""

    checked_site: str
    acknowledged: int
    keys: tuple[str, ...]
    first_acked_at: str | None
    last_acked_at: str | None

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class ServiceSummary:
    service: str
    operations: tuple[str, ...]
    requests: int
    ok: int
    failed: int
    failures_by_outcome: dict[str, int]
    answers_by_site: dict[str, int]
    outage_windows: tuple[OutageWindow, ...]
    acknowledged_writes: int | None  # None for a service that is only read


def outage_windows(entries: Sequence[LedgerEntry]) -> list[OutageWindow]:
    """``entries`` of one service, in the order they were sent."""
    windows: list[OutageWindow] = []
    last_ok: LedgerEntry | None = None
    failures: list[LedgerEntry] = []
    for entry in entries:
        if not entry.ok:
            failures.append(entry)
            continue
        if failures:
            windows.append(_window(last_ok, failures, entry))
            failures = []
        last_ok = entry
    if failures:
        windows.append(_window(last_ok, failures, None))
    return windows


def _window(before: LedgerEntry | None, failures: list[LedgerEntry], after: LedgerEntry | None) -> OutageWindow:
    duration = after.answered_mono - before.answered_mono if before and after else None
    return OutageWindow(
        start=before.answered_at if before else None,
        end=after.answered_at if after else None,
        duration_s=round(duration, 6) if duration is not None else None,
        site_before=before.site if before else None,
        site_after=after.site if after else None,
        failed_requests=len(failures),
        first_failure_at=min(failure.answered_at for failure in failures),
        last_failure_at=max(failure.answered_at for failure in failures),
    )


def summarise_service(service: str, entries: Sequence[LedgerEntry], writes: bool) -> ServiceSummary:
    ok = [entry for entry in entries if entry.ok]
    return ServiceSummary(
        service=service,
        operations=tuple(sorted({entry.operation for entry in entries})),
        requests=len(entries),
        ok=len(ok),
        failed=len(entries) - len(ok),
        failures_by_outcome=dict(Counter(entry.outcome for entry in entries if not entry.ok).most_common()),
        answers_by_site=dict(Counter(entry.site for entry in entries if entry.site).most_common()),
        outage_windows=tuple(outage_windows(entries)),
        acknowledged_writes=len(ok) if writes else None,
    )


def missing_writes(acknowledged: Sequence[LedgerEntry], present_keys: Collection[str], site: str) -> MissingWrites:
    """Which of the ``acknowledged`` write requests have no row in ``site``'s database."""
    missing = [entry for entry in acknowledged if entry.key not in present_keys]
    acked_times = [entry.answered_at for entry in missing]
    return MissingWrites(
        checked_site=site,
        acknowledged=len(acknowledged),
        keys=tuple(entry.key for entry in missing),
        first_acked_at=min(acked_times) if acked_times else None,
        last_acked_at=max(acked_times) if acked_times else None,
    )
