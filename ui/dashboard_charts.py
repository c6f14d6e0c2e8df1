"""Plotly figures and display formats of the dashboard page: presentation only, from `clawdbot.metrics` data."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import plotly.graph_objects as go

from clawdbot.metrics import Traffic

STATUS_COLOURS = {
    "ok": "#2e7d32",
    "error": "#c62828",
    "timeout": "#ef6c00",
    "busy": "#f9a825",
    "rate_limited": "#8e24aa",
    "cancelled": "#757575",
    "rejected_input": "#5d4037",
    "abandoned": "#37474f",
}
_HEIGHT = 260


def _layout(fig: go.Figure, title: str, unit: str) -> go.Figure:
    fig.update_layout(
        title={"text": title, "font": {"size": 14}},
        height=_HEIGHT,
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        legend={"orientation": "h", "y": -0.2},
        yaxis={"title": unit, "rangemode": "tozero"},
        hovermode="x unified",
    )
    return fig


def _lines(
    title: str, unit: str, x: Sequence[datetime], series: Mapping[str, Sequence[float | None]]
) -> go.Figure:
    fig = go.Figure(
        [go.Scatter(x=list(x), y=list(y), name=name, mode="lines+markers") for name, y in series.items()]
    )
    return _layout(fig, title, unit)


def traffic_figures(traffic: Traffic) -> dict[str, go.Figure]:
    """The window's charts by key: rate, latency, ttft, tokens, status, agent, model."""
    x = [p.start for p in traffic.points]
    points = traffic.points
    status = go.Figure(
        [
            go.Bar(x=x, y=counts, name=name, marker_color=STATUS_COLOURS.get(name))
            for name, counts in traffic.by_status.items()
        ]
    )
    status.update_layout(barmode="stack")
    return {
        "rate": _lines("Requests per second", "req/s", x, {"requests/s": [p.requests_per_s for p in points]}),
        "latency": _lines(
            "Latency (ok requests)",
            "ms",
            x,
            {
                "p50": [p.latency_p50 for p in points],
                "p95": [p.latency_p95 for p in points],
                "p99": [p.latency_p99 for p in points],
            },
        ),
        "ttft": _lines(
            "Time to first token",
            "ms",
            x,
            {"p50": [p.ttft_p50 for p in points], "p95": [p.ttft_p95 for p in points]},
        ),
        "tokens": _lines(
            "Tokens per second",
            "tok/s",
            x,
            {
                "output tokens/s (all requests)": [p.tokens_per_s for p in points],
                "median request's speed": [p.decode_p50 for p in points],
            },
        ),
        "status": _layout(status, "Outcomes by status", "requests"),
        "agent": _layout(
            go.Figure([go.Bar(x=list(traffic.by_agent), y=list(traffic.by_agent.values()))]),
            "Requests by agent",
            "requests",
        ),
        "model": _layout(
            go.Figure([go.Bar(x=list(traffic.by_model), y=list(traffic.by_model.values()))]),
            "Requests by model",
            "requests",
        ),
    }


def history_figure(
    title: str, unit: str, history: Mapping[str, Sequence[tuple[datetime, float, float]]]
) -> go.Figure:
    """Sampled figures over time (the mean of each point; the peak in the hover text)."""
    fig = go.Figure(
        [
            go.Scatter(
                x=[at for at, _, _ in points],
                y=[mean for _, mean, _ in points],
                customdata=[peak for _, _, peak in points],
                hovertemplate="%{y:.1f} (peak %{customdata:.1f})",
                name=name,
                mode="lines",
            )
            for name, points in history.items()
        ]
    )
    return _layout(fig, title, unit)


def gib(size: int | None) -> str:
    return "—" if size is None else f"{size / 2**30:.1f} GiB"


def in_words(seconds: float) -> str:
    """9 → '9 s', 125 → '2 min 5 s', 7300 → '2 h 1 min'; past times are 'now'."""
    if seconds <= 0:
        return "now"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"
