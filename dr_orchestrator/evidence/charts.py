"""Charts as inline SVG, drawn on the server: reports need no JavaScript and print as they show."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

WIDTH, HEIGHT = 640, 170
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 28, 34


@dataclass(frozen=True)
class Point:
    at: datetime
    rto_s: float
    met: bool | None


def _seconds_label(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.3g} h"
    if value >= 60:
        return f"{value / 60:.3g} min"
    return f"{value:.3g} s"


def rto_chart(service: str, points: Sequence[Point], target_s: float | None, start: datetime, end: datetime) -> str:
    """One service's achieved RTO per run over [start, end), its target as a dashed line."""
    span = max((end - start).total_seconds(), 1.0)
    top_value = max([p.rto_s for p in points] + ([target_s] if target_s is not None else []) + [1e-3]) * 1.15
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(at: datetime) -> float:
        return LEFT + plot_w * min(max((at - start).total_seconds() / span, 0.0), 1.0)

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top_value)

    title = escape(f"RTO of {service}")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="rto-chart" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title}">',
        f"<title>{title}</title>",
        f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{title}</text>',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="#444"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#444"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 4}" font-size="10" text-anchor="end">{_seconds_label(top_value)}</text>',
        f'<text x="{LEFT - 6}" y="{TOP + plot_h}" font-size="10" text-anchor="end">0</text>',
        f'<text x="{LEFT}" y="{HEIGHT - 8}" font-size="10">{start.date().isoformat()}</text>',
        f'<text x="{LEFT + plot_w}" y="{HEIGHT - 8}" font-size="10" text-anchor="end">{end.date().isoformat()}</text>',
    ]
    if target_s is not None:
        ty = y(target_s)
        parts.append(
            f'<line class="target" x1="{LEFT}" y1="{ty:.1f}" x2="{LEFT + plot_w}" y2="{ty:.1f}" '
            'stroke="#c0392b" stroke-dasharray="6 4"/>'
        )
        parts.append(
            f'<text x="{LEFT + plot_w}" y="{ty - 4:.1f}" font-size="10" fill="#c0392b" text-anchor="end">'
            f"target {_seconds_label(target_s)}</text>"
        )
    ordered = sorted(points, key=lambda p: p.at)
    if len(ordered) > 1:
        path = " ".join(f"{x(p.at):.1f},{y(p.rto_s):.1f}" for p in ordered)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#2c3e50" stroke-width="1.5"/>')
    for p in ordered:
        colour = "#27ae60" if p.met else "#c0392b" if p.met is False else "#7f8c8d"
        label = escape(f"{p.at.isoformat()}: {p.rto_s:.3f} s")
        parts.append(
            f'<circle class="run" cx="{x(p.at):.1f}" cy="{y(p.rto_s):.1f}" r="4" fill="{colour}">'
            f"<title>{label}</title></circle>"
        )
    if not ordered:
        parts.append(
            f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" font-size="12" text-anchor="middle">'
            "no restore measured in the period</text>"
        )
    parts.append("</svg>")
    return "\n".join(parts)
