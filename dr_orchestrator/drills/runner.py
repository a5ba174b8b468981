"""Run a drill end to end as a rehearsal: fault, failover, expectation checks, restore (undo the
fault, e.g. power back at the lost site), failback, cleanup.

Every part is a run of the normal engine, recorded by the normal evidence store and linked to the
drill run. The fault's end is the incident time of the failover run. The cleanup always runs: after
a failure, after Ctrl-C or a stop request, and after a bug in this module.

Verdict: passed only when every stage succeeded, every expectation was met and the cleanup is done.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionRegistry
from dr_orchestrator.drills.notifier import DrillNotifier
from dr_orchestrator.engine import RunOutcome
from dr_orchestrator.evidence import drills as records
from dr_orchestrator.evidence.store import EvidenceFallback
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.drill import Drill, NotifyEvent, Steps
from dr_orchestrator.model.durations import format_duration
from dr_orchestrator.model.events import Event, MarkerReached, Observer, StepFinished
from dr_orchestrator.model.run import Phase, RunKind, RunPlan, RunState, SourceDocument
from dr_orchestrator.model.watch import settings_of
from dr_orchestrator.plans import build_plan, default_actor
from dr_orchestrator.runs.execute import LockHeld, execute
from dr_orchestrator.yamlsource import LoadError

log = logging.getLogger(__name__)

FAULT_MARKER = "fault_injected"  # a fault step may mark the exact moment; else the fault's end counts


class _Stop(Exception):
    """The drill cannot go on (a stage failed or was stopped); the cleanup still runs."""


@dataclass
class DrillOutcome:
    drill_run_id: str
    state: str  # finished | aborted
    verdict: str  # passed | failed
    expectations: list[records.ExpectationResult] = field(default_factory=list)
    cleanup_state: str = "none"
    cleanup_left: list[str] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"


class _StepLog:
    """What the engine said about each step of each run, kept for judging checks and the cleanup."""

    def __init__(self) -> None:
        self.finished: dict[tuple[str, str], StepFinished] = {}
        self.markers: dict[str, list[MarkerReached]] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepFinished) and event.phase == Phase.FORWARD:
            self.finished[(event.run_id, event.step_id)] = event
        elif isinstance(event, MarkerReached):
            self.markers.setdefault(event.run_id, []).append(event)

    def why_failed(self, run_id: str) -> str | None:
        """The steps of the run that failed or timed out, with their errors (what an operator reads first)."""
        failed = [f"{step_id} {event.state}: {event.error}" for (rid, step_id), event in self.finished.items()
                  if rid == run_id and event.state in ("failed", "timed_out") and event.error]
        return "; ".join(failed) or None

    def fault_time(self, run_id: str) -> datetime | None:
        marked = [m.at for m in self.markers.get(run_id, []) if m.marker == FAULT_MARKER]
        if marked:
            return min(marked)
        ends = [e.at for (rid, _), e in self.finished.items() if rid == run_id and e.state == "succeeded"]
        return max(ends) if ends else None


class DrillRunner:
    def __init__(self, sessions: records.Sessions, registry: ActionRegistry | None = None,
                 observers: list[Observer] | None = None, host: str | None = None,
                 heartbeat_s: float = 10.0, fence: Callable[[], object] | None = None,
                 fallback: EvidenceFallback | None = None) -> None:
        """``fence`` and ``fallback``: a cluster leader's, for each of the drill's runs (see ``runs.execute``);
        one fence for the whole drill, so a drill started under one term never goes on under another."""
        self.sessions = sessions
        self.registry = registry or default_registry()
        self.extra_observers = list(observers or [])
        self.host = host or socket.gethostname()
        self.heartbeat_s = heartbeat_s
        self.fence = fence
        self.fallback = fallback

    def run(self, drill: Drill, *, trigger: str = "manual", scheduled_for: datetime | None = None,
            started_by: str | None = None, stop: threading.Event | None = None,
            drill_run_id: str | None = None, recorded: threading.Event | None = None) -> DrillOutcome:
        """Run ``drill``; raises records.FireTimeTaken when ``scheduled_for`` already has a run.
        ``recorded`` is set once the drill run is in the evidence (for callers that run it in a thread)."""
        return _DrillRun(self, drill, trigger, scheduled_for, started_by or default_actor(),
                         stop or threading.Event(), drill_run_id or str(uuid.uuid4())).execute(recorded)


class _DrillRun:
    def __init__(self, runner: DrillRunner, drill: Drill, trigger: str, scheduled_for: datetime | None,
                 started_by: str, stop: threading.Event, drill_run_id: str) -> None:
        self.runner = runner
        self.drill = drill
        self.trigger = trigger
        self.scheduled_for = scheduled_for
        self.started_by = started_by
        self.stop = stop
        self.outcome = DrillOutcome(drill_run_id, "finished", "failed")
        self.steps = _StepLog()
        self.observers: list[Observer] = [self.steps, *runner.extra_observers]  # after the evidence store
        self.notifier = DrillNotifier(drill.notify, runner.sessions)
        self.failures: list[str] = []
        self.incident_at: datetime | None = None

    @property
    def id(self) -> str:
        return self.outcome.drill_run_id

    # -- the whole drill ---------------------------------------------------------------------------

    def execute(self, recorded: threading.Event | None = None) -> DrillOutcome:
        drill = self.drill
        records.start_drill_run(self.runner.sessions, records.DrillRunStart(
            drill_run_id=self.id, drill_name=drill.name, scenario=drill.scenario.value, trigger=self.trigger,
            scheduled_for=self.scheduled_for, started_by=self.started_by, host=self.runner.host,
            drill_path=drill.path, drill_sha256=drill.sha256, drill_text=drill.text, inventory_path=drill.inventory))
        if recorded is not None:
            recorded.set()
        self.notify(NotifyEvent.STARTED, "started",
                    f"{drill.scenario.value} rehearsal, trigger {self.trigger}"
                    + (f" for {self.scheduled_for.isoformat()}" if self.scheduled_for else ""))
        beating = threading.Event()
        heart = threading.Thread(target=self._heartbeat, args=(beating,), name="drill-heartbeat", daemon=True)
        heart.start()
        try:
            try:
                self.rehearse()
            except _Stop:
                pass
            except KeyboardInterrupt:
                self.outcome.state = "aborted"
                self.failures.append("interrupted by the operator")
            except Exception as exc:  # noqa: BLE001 - recorded; the cleanup must still run
                log.exception("drill %s failed inside the runner", drill.name)
                self.failures.append(f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self.clean_up()
        finally:
            beating.set()
            heart.join()
            self.finish()
        return self.outcome

    def rehearse(self) -> None:
        drill = self.drill
        if drill.fault is not None:
            fault = self.run_stage("fault", self.steps_plan(drill.fault, "fault", incident_at=None))
            self.require(fault, "the fault could not be injected")
            self.incident_at = self.steps.fault_time(fault.run_id)
            if self.incident_at is not None:
                records.set_incident_time(self.runner.sessions, self.id, self.incident_at)
        plan = build_plan(drill.runbook.path, drill.inventory, drill.runbook.parameters, kind=RunKind.REHEARSAL,
                          incident_at=self.incident_at, started_by=self.started_by, trigger=self.trigger,
                          reason=f"drill {drill.name}", registry=self.runner.registry)
        plan = plan.model_copy(update={"scenario": drill.fault_description or drill.scenario.value,
                                       "test_type": f"drill: {drill.scenario.value}",
                                       "pre_approved_by": self.pre_approved_by})
        failover = self.run_stage("failover", plan)
        checks = self.run_stage("checks", self.steps_plan(drill.checks, "checks", self.incident_at)) \
            if drill.checks is not None else None
        self.judge(failover, checks)
        self.require(failover, "the failover runbook did not succeed")
        if drill.restore is not None:
            restore = self.run_stage("restore", self.steps_plan(drill.restore, "restore", self.incident_at))
            self.require(restore, "the fault could not be undone before the failback")
        if drill.failback is not None:
            failback_plan = build_plan(drill.failback.path, drill.inventory, drill.failback.parameters,
                                       kind=RunKind.FAILBACK, started_by=self.started_by, trigger=self.trigger,
                                       reason=f"drill {drill.name}: failback", registry=self.runner.registry)
            failback_plan = failback_plan.model_copy(update={"failback_of": failover.run_id,
                                                             "pre_approved_by": self.pre_approved_by})
            self.require(self.run_stage("failback", failback_plan), "the failback runbook did not succeed")

    @property
    def pre_approved_by(self) -> str | None:
        """Who passes the approval gates of the drill's runbooks: the drill, when it says so."""
        return f"drill {self.drill.name}" if self.drill.pre_approved else None

    def require(self, outcome: RunOutcome, failure: str) -> None:
        if outcome.state is RunState.SUCCEEDED:
            return
        if outcome.state is RunState.ABORTED:
            self.outcome.state = "aborted"
            self.failures.append(f"{failure}: stopped ({outcome.error or 'interrupted'})")
        else:
            why = outcome.error or self.steps.why_failed(outcome.run_id) or outcome.state.value
            self.failures.append(f"{failure}: {why}")
        raise _Stop

    def run_stage(self, stage: str, plan: RunPlan, stop: threading.Event | None = None) -> RunOutcome:
        run_id = str(uuid.uuid4())
        records.link_run(self.runner.sessions, self.id, stage, run_id)
        self.outcome.runs[stage] = run_id
        try:  # the services' locks, a heartbeat, approval gates answered from the evidence database
            outcome = execute(self.runner.sessions, plan, observers=self.observers, registry=self.runner.registry,
                              run_id=run_id, stop=stop or self.stop, host=self.runner.host, fence=self.runner.fence,
                              fallback=self.runner.fallback)
        except LockHeld as exc:
            self.failures.append(f"the {stage} stage was refused: {exc}")
            raise _Stop from None
        if outcome.state is RunState.ABORTED and self.outcome.state != "aborted" and stage != "cleanup":
            self.outcome.state = "aborted"
        return outcome

    def steps_plan(self, steps: Steps, part: str, incident_at: datetime | None) -> RunPlan:
        """A plan for steps held in the drill file; its source is the drill file itself."""
        drill = self.drill
        inventory, inventory_document = load_inventory(drill.inventory)
        parameters = {"drill_run_id": self.id}
        return RunPlan(
            runbook=steps.runbook, inventory=inventory, parameters=parameters, kind=RunKind.REHEARSAL,
            incident_at=incident_at, started_by=self.started_by, reason=f"drill {drill.name}: {part}",
            trigger=self.trigger,
            runbook_source=SourceDocument(path=f"{drill.path}#{part}", sha256=drill.sha256, text=drill.text),
            inventory_source=SourceDocument(path=str(Path(inventory_document.path)),
                                            sha256=inventory_document.sha256, text=inventory_document.text),
            parameters_sha256=hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest(),
            guarded=False,  # a fault degrades on purpose; the failover and failback runs are guarded
        )

    # -- expectations ------------------------------------------------------------------------------

    def judge(self, failover: RunOutcome, checks: RunOutcome | None) -> None:
        results: list[records.ExpectationResult] = []
        with self.runner.sessions() as session:
            measured = records.service_results(session, failover.run_id)
            check_steps = records.forward_steps(session, checks.run_id) if checks is not None else {}
        for expectation in self.drill.expectations:
            service = expectation.service
            row = measured.get(service)
            # A restore point is judged on the measured RPO (how far back the restore went).
            for kind, figure, target in (("rto", "rto", expectation.rto), ("rpo", "rpo", expectation.rpo),
                                         ("restore_point", "rpo", expectation.restore_point)):
                if target is None:
                    continue
                value = getattr(row, f"{figure}_s") if row is not None else None
                method = getattr(row, f"{figure}_method") if row is not None else ""
                fixed = getattr(row, f"{figure}_target_s") if row is not None else None
                service_target = "" if fixed is None else f"; the service's {figure.upper()} target is " \
                    f"{format_duration(fixed)}, judged in its reports"
                if value is None:
                    detail = f"{kind.upper()}: {method or 'not measured: the failover run has no result for it'}"
                    results.append(records.ExpectationResult(service, kind, False, detail, target, None,
                                                             run_id=failover.run_id))
                    continue
                met = value <= target
                detail = (f"{kind.upper().replace('_', ' ')} {format_duration(value)} {'within' if met else 'over'} "
                          f"the drill's {format_duration(target)}{service_target}; {method}")
                results.append(records.ExpectationResult(service, kind, met, detail, target, value,
                                                         run_id=failover.run_id))
            for kind, ids in (("health", expectation.health), ("data", expectation.data)):
                for check_id in ids:
                    step = check_steps.get(check_id)
                    met = step is not None and step.state == "succeeded"
                    if step is None:
                        detail = "the check did not run"
                    else:
                        detail = step.state + (f": {step.error}" if step.error else "")
                    results.append(records.ExpectationResult(service, kind, met, detail, check_id=check_id,
                                                             run_id=checks.run_id if checks else None))
        self.outcome.expectations = results
        records.record_expectations(self.runner.sessions, self.id, results)
        missed = [r for r in results if not r.met]
        if missed:
            self.notify(NotifyEvent.EXPECTATION_MISSED, f"missed {len(missed)} expectation(s)",
                        "\n".join(f"- {r.service} {r.kind}{' ' + r.check_id if r.check_id else ''}: {r.detail}"
                                  for r in missed))

    # -- cleanup and the end -----------------------------------------------------------------------

    def clean_up(self) -> None:
        cleanup = self.drill.cleanup
        if cleanup is None:
            self.outcome.cleanup_state = "none"
            return
        left: list[str] = []
        try:
            # Its own stop: a stop request for the drill must not stop the tidying after it.
            outcome = self.run_stage("cleanup", self.steps_plan(cleanup, "cleanup", self.incident_at),
                                     stop=threading.Event())
            for step_id, state in outcome.steps.items():
                if state.value != "succeeded" and not (state.value == "skipped" and self._skipped_by_when(
                        outcome.run_id, step_id)):
                    left.append(f"{step_id} ({state.value})")
        except KeyboardInterrupt:
            left.append("the cleanup was interrupted by the operator")
        except Exception as exc:  # noqa: BLE001 - recorded as what is left to do
            log.exception("cleanup of drill %s failed", self.drill.name)
            left.append(f"the cleanup could not run: {type(exc).__name__}: {exc}")
        self.outcome.cleanup_state = "incomplete" if left else "done"
        self.outcome.cleanup_left = left

    def _skipped_by_when(self, run_id: str, step_id: str) -> bool:
        event = self.steps.finished.get((run_id, step_id))
        return event is not None and (event.error or "").startswith("when ")

    def finish(self) -> None:
        outcome = self.outcome
        missed = [r for r in outcome.expectations if not r.met]
        passed = not self.failures and not missed and outcome.cleanup_state != "incomplete"
        outcome.verdict = "passed" if passed else "failed"
        reasons = list(self.failures)
        if missed:
            reasons.append(f"{len(missed)} expectation(s) missed")
        if outcome.cleanup_state == "incomplete":
            reasons.append("cleanup incomplete: " + "; ".join(outcome.cleanup_left))
        outcome.error = "; ".join(reasons) or None
        records.finish_drill_run(self.runner.sessions, self.id, state=outcome.state, verdict=outcome.verdict,
                                 cleanup_state=outcome.cleanup_state, cleanup_left=outcome.cleanup_left,
                                 error=outcome.error)
        met = sum(1 for r in outcome.expectations if r.met)
        text = (f"verdict {outcome.verdict}: {met}/{len(outcome.expectations)} expectations met, "
                f"cleanup {outcome.cleanup_state}" + (f"; {outcome.error}" if outcome.error else ""))
        if passed:
            self.notify(NotifyEvent.COMPLETED, "passed", text)
        else:
            self.notify(NotifyEvent.FAILED, "failed", text)
        self.notifier.close()

    def notify(self, event: NotifyEvent, headline: str, text: str) -> None:
        subject = f"DR drill {self.drill.name}: {headline}"
        outcome = self.outcome
        server = self.server_url
        failover = outcome.runs.get("failover")
        fields = {"drill": self.drill.name, "drill_run": self.id, "scenario": self.drill.scenario.value,
                  "trigger": self.trigger, "error": outcome.error,
                  "verdict": outcome.verdict if event in (NotifyEvent.COMPLETED, NotifyEvent.FAILED) else None,
                  "runs": dict(outcome.runs),
                  # each service's RTO and RPO against the drill's targets, as judged (and every check)
                  "services": service_figures(outcome.expectations),
                  "expectations": [result.as_dict() for result in outcome.expectations],
                  "details": f"dr drill show {self.id}",
                  "link": f"{server}/api/drill-runs/{self.id}" if server else None,
                  "report": f"{server}/api/runs/{failover}/report" if server and failover else None}
        self.notifier.send(self.id, event, subject, f"{subject}\n{text}\ndrill run {self.id}", fields)

    @functools.cached_property
    def server_url(self) -> str | None:
        """Where `dr serve` answers (the inventory's dr.watch.base_url), for links; None when not said."""
        try:
            inventory, _ = load_inventory(self.drill.inventory)
        except LoadError:  # the drill's stages say so; a notice goes out without links
            return None
        base_url = settings_of(inventory).base_url
        return base_url.rstrip("/") if base_url else None

    def _heartbeat(self, done: threading.Event) -> None:
        while not done.wait(self.runner.heartbeat_s):
            try:
                records.beat(self.runner.sessions, self.id)
            except Exception:  # noqa: BLE001 - a missed beat is not worth stopping a drill for
                log.warning("drill run %s: heartbeat not recorded", self.id, exc_info=True)


def service_figures(results: list[records.ExpectationResult]) -> dict[str, dict[str, Any]]:
    """Each service's RTO and RPO as judged: ``{"trading": {"rto_s": 1.2, "rto_target_s": 60, "rto_met": True,
    ...}}``."""
    figures: dict[str, dict[str, Any]] = {}
    for result in results:
        if result.kind in ("rto", "rpo"):
            figures.setdefault(result.service, {}).update({
                f"{result.kind}_s": result.measured, f"{result.kind}_target_s": result.target,
                f"{result.kind}_met": result.met})
    return figures


def outcome_as_dict(outcome: DrillOutcome) -> dict[str, Any]:
    return {"drill_run_id": outcome.drill_run_id, "state": outcome.state, "verdict": outcome.verdict,
            "expectations": [r.as_dict() for r in outcome.expectations], "cleanup_state": outcome.cleanup_state,
            "cleanup_left": outcome.cleanup_left, "runs": outcome.runs, "error": outcome.error}
