"""DR capability levels of GB/T 20988: a service reaches the highest level whose every capability
element (as the inventory declares it) and whose RTO/RPO bounds (met by the worst figures of the
period's tests, never by one run) are met, every level below it included.

The default table of bounds (``capability_levels.yml`` next to this module) names its source and
says what the figures can and cannot show; read it before quoting a level.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from dr_orchestrator.model.inventory import CAPABILITY_ELEMENTS

DEFAULT_LEVELS = Path(__file__).with_name("capability_levels.yml")


class LevelsError(ValueError):
    """The levels file cannot be used; one sentence."""


@dataclass(frozen=True)
class Level:
    level: int
    name: str
    cited: str
    rto_max_s: float | None  # None: no bound
    rpo_max_s: float | None

    def met_by(self, rto_s: float, rpo_s: float) -> bool:
        return not self.figures_missed(rto_s, rpo_s)

    def figures_missed(self, rto_s: float | None, rpo_s: float | None) -> list[str]:
        """Why the figures do not meet this level's bounds (None: not measured); empty when they do."""
        missed = []
        for name, value, bound in (("RTO", rto_s, self.rto_max_s), ("RPO", rpo_s, self.rpo_max_s)):
            if bound is None:
                continue
            if value is None:
                missed.append(f"{name} not measured")
            elif value > bound:
                missed.append(f"worst {name} {value:g} s over level {self.level}'s {bound:g} s")
        return missed


@dataclass(frozen=True)
class Assessment:
    """A service's level in a period, and why it is not one higher."""

    level: Level | None
    limited_by: tuple[str, ...]
    worst_rto_s: float | None
    worst_rpo_s: float | None
    elements: Mapping[str, int]
    notes: tuple[str, ...] = ()  # e.g. a figure some tests did not measure


@dataclass(frozen=True)
class LevelTable:
    source: str
    levels: tuple[Level, ...]

    def reached(self, rto_s: float | None, rpo_s: float | None) -> Level | None:
        """The highest level whose bounds both figures meet; None when a figure is missing or none is met."""
        if rto_s is None or rpo_s is None:
            return None
        met = [level for level in self.levels if level.met_by(rto_s, rpo_s)]
        return max(met, key=lambda level: level.level, default=None)

    def assess(self, elements: Mapping[str, int], figures: Iterable[tuple[float | None, float | None]]
               ) -> Assessment:
        """The highest level such that it and every level below it have each capability element
        declared at that level or above and bounds that the worst measured of ``figures`` (RTO, RPO
        of each test in the period) meet; a test that did not measure a figure shows nothing about
        it (said in ``notes``), and a figure no test measured meets no bound. No tests: no level."""
        pairs = list(figures)
        worst: dict[str, float | None] = {}
        notes = []
        for index, name in enumerate(("RTO", "RPO")):
            measured = [value for value in (pair[index] for pair in pairs) if value is not None]
            worst[name] = max(measured) if measured else None
            if measured and len(measured) < len(pairs):
                notes.append(f"{name} not measured in {len(pairs) - len(measured)} of {len(pairs)} tests: "
                             "the worst of the others counts")
        reached: Level | None = None
        limits: list[str] = ["no test in the period"] if not pairs else []
        for level in sorted(self.levels, key=lambda item: item.level) if pairs else ():
            limits = [f"{name} not declared" for name in CAPABILITY_ELEMENTS if name not in elements]
            limits += [f"{name} meets level {elements[name]}" for name in CAPABILITY_ELEMENTS
                       if name in elements and elements[name] < level.level]
            limits += level.figures_missed(worst["RTO"], worst["RPO"])
            if limits:
                break
            reached = level
        return Assessment(reached, tuple(limits), worst["RTO"], worst["RPO"], dict(elements), tuple(notes))


def load_levels(path: str | Path | None = None) -> LevelTable:
    where = Path(path) if path else DEFAULT_LEVELS
    try:
        data = yaml.safe_load(where.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LevelsError(f"cannot read the levels file {where}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise LevelsError(f"the levels file {where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("levels"), list) or not data.get("source"):
        raise LevelsError(f"the levels file {where} needs 'source' (where the figures come from) and a 'levels' list")
    levels = []
    for index, item in enumerate(data["levels"], 1):
        try:
            levels.append(
                Level(
                    level=int(item["level"]),
                    name=str(item.get("name", "")),
                    cited=str(item.get("cited", "")),
                    rto_max_s=None if item.get("rto_max_s") is None else float(item["rto_max_s"]),
                    rpo_max_s=None if item.get("rpo_max_s") is None else float(item["rpo_max_s"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            raise LevelsError(
                f"level #{index} in {where} needs a numeric 'level' and numeric or null 'rto_max_s', 'rpo_max_s'"
            ) from None
    return LevelTable(source=str(data["source"]).strip(), levels=tuple(levels))
