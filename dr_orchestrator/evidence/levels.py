"""DR capability levels reached by achieved RTO/RPO, from a configurable table of bounds per level.

The default table (``capability_levels.yml`` next to this module) names its source and says what
the figures can and cannot show; read it before quoting a level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

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
        return (self.rto_max_s is None or rto_s <= self.rto_max_s) and (
            self.rpo_max_s is None or rpo_s <= self.rpo_max_s
        )


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
