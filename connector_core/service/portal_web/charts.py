"""Server-rendered SVG charts for the reports page: no script, no colour needed to read them.

Each chart is an ``<svg role="img">`` named by its ``<title>`` and described by its ``<desc>``
(what it shows and its main figures, in the page's language); series differ by pattern as well
as colour (solid, hatched), every bar carries its value where there is room, and the page puts
the same figures in a table beside it. Text is escaped here: the result is safe markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

__all__ = ["Bar", "bar_chart"]

_WIDTH = 720
_HEIGHT = 240
_LEFT = 40
_RIGHT = 12
_TOP = 16
_BOTTOM = 44


@dataclass(frozen=True)
class Bar:
    """One bar: its label, and its segments bottom-up (value and series index)."""

    label: str
    segments: tuple[int, ...]


def _nice_max(value: int) -> int:
    if value <= 4:
        return max(value, 1)
    step = 1
    while step * 10 < value:
        step *= 10
    for factor in (1, 2, 5, 10):
        if step * factor >= value:
            return step * factor
    return value


def bar_chart(
    *,
    chart_id: str,
    title: str,
    description: str,
    bars: Sequence[Bar],
    series: Sequence[str],
) -> Markup:
    """A (stacked) bar chart. ``series`` names the segments (the legend), drawn as
    ``series-0`` solid and ``series-1`` hatched (CSS colours them)."""
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    top = _nice_max(max((sum(b.segments) for b in bars), default=0))
    slot = plot_w / max(len(bars), 1)
    bar_w = max(1.0, slot * 0.7)
    show_values = slot >= 18
    label_every = max(1, round(len(bars) / 12 + 0.49)) if bars else 1
    parts: list[str] = [
        f'<svg class="chart" id="{escape(chart_id)}" role="img" viewBox="0 0 {_WIDTH} '
        f'{_HEIGHT}" aria-labelledby="{escape(chart_id)}-title {escape(chart_id)}-desc" '
        'preserveAspectRatio="xMidYMid meet" focusable="false">',
        f'<title id="{escape(chart_id)}-title">{escape(title)}</title>',
        f'<desc id="{escape(chart_id)}-desc">{escape(description)}</desc>',
        f'<defs><pattern id="{escape(chart_id)}-hatch" patternUnits="userSpaceOnUse" '
        'width="6" height="6" patternTransform="rotate(45)">'
        '<rect class="hatch-ground" width="6" height="6"/>'
        '<line class="hatch-line" x1="0" y1="0" x2="0" y2="6" stroke-width="3"/></pattern></defs>',
        '<g class="axis" aria-hidden="true">',
    ]
    for tick in (0, top // 2, top):
        y = _TOP + plot_h - plot_h * tick / top
        parts.append(
            f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{_WIDTH - _RIGHT}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>'
        )
    parts.append("</g>")
    parts.append('<g class="bars" aria-hidden="true">')
    for index, bar in enumerate(bars):
        x = _LEFT + slot * index + (slot - bar_w) / 2
        y = _TOP + plot_h
        for series_index, value in enumerate(bar.segments):
            if value <= 0:
                continue
            h = plot_h * value / top
            y -= h
            fill = f' fill="url(#{escape(chart_id)}-hatch)"' if series_index % 2 else ""
            parts.append(
                f'<rect class="bar series-{series_index}" x="{x:.1f}" y="{y:.1f}" '
                f'width="{bar_w:.1f}" height="{h:.1f}"{fill}/>'
            )
        total = sum(bar.segments)
        if show_values and total:
            parts.append(
                f'<text class="value" x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" '
                f'text-anchor="middle">{total}</text>'
            )
        if index % label_every == 0 or index == len(bars) - 1:
            parts.append(
                f'<text class="label" x="{x + bar_w / 2:.1f}" y="{_TOP + plot_h + 16}" '
                f'text-anchor="middle">{escape(bar.label)}</text>'
            )
    parts.append("</g>")
    if len(series) > 1:
        parts.append('<g class="legend" aria-hidden="true">')
        x = _LEFT
        for series_index, name in enumerate(series):
            fill = f' fill="url(#{escape(chart_id)}-hatch)"' if series_index % 2 else ""
            parts.append(
                f'<rect class="bar series-{series_index}" x="{x}" y="{_HEIGHT - 16}" '
                f'width="12" height="12"{fill}/>'
                f'<text class="legend-text" x="{x + 16}" y="{_HEIGHT - 6}">{escape(name)}</text>'
            )
            x += 24 + 8 * len(name)
        parts.append("</g>")
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text above went through escape()
