"""The gradient-flow figures, shared by Train (live, per run) and Inspect (a saved run).

    flow_figure(epochs, rows, "h", "run1 · scratch-512", zrange)   # heatmap: step t across, epoch down
    sigma_figure([("run1", epochs, sigmas), ...])                  # sigma_max(W_hh) per epoch, 1 marked

Plain Plotly dicts, so the Train page's live charts (pages/live_plot.py) and st.plotly_chart can
both draw them. The numbers come from charrnn.gradflow; nothing here computes a gradient.
"""
from __future__ import annotations

import html
import math

QUANTITIES = {  # which norm a heatmap shows: (its name in the title, the variable, a short name)
    "h": ("‖∂ℓ_T/∂h_t‖", "h_t", "the hidden state after step t"),
    "x": ("‖∂ℓ_T/∂x_t‖", "x_t", "the input at step t (saliency)"),
}
SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def quantity_label(which: str) -> str:
    """A choice's label on the pages' radios, e.g. "h_t, the hidden state after step t"."""
    _, variable, name = QUANTITIES[which]
    return f"{variable}, {name}"


def log10(v: float) -> float | None:
    """The colour of a norm; None (a blank cell) for 0, NaN or infinity."""
    return math.log10(v) if v > 0 and math.isfinite(v) else None


def zrange(rows_of_runs: list[list[list[float]]]) -> list[float] | None:
    """One log colour range over every run drawn, so side-by-side heatmaps compare: whole decades."""
    logs = [z for rows in rows_of_runs for row in rows for v in row if (z := log10(v)) is not None]
    if not logs:
        return None
    lo, hi = math.floor(min(logs)), math.ceil(max(logs))
    return [lo, hi if hi > lo else lo + 1]


def flow_figure(epochs: list[int], rows: list[list[float]], which: str, label: str,
                z: list[float] | None, height: int = 300) -> dict:
    """Step t across, the epochs probed down (newest at the bottom), the norm's log as colour."""
    symbol, variable, _ = QUANTITIES[which]
    steps = len(rows[0]) if rows else 0
    lo, hi = z or [-3, 0]
    every = max(1, math.ceil((hi - lo) / 6))          # at most about 7 labels on the colour bar
    ticks = list(range(int(hi), int(lo) - 1, -every))[::-1]
    # one row per probe, equally tall, named by its epoch: probes come at uneven epochs (a numeric
    # axis would stretch each row over the gap to the next)
    trace = dict(type="heatmap", x=list(range(1, steps + 1)), y=[str(e) for e in epochs],
                 z=[[log10(v) for v in row] for row in rows], customdata=rows, zmin=lo, zmax=hi,
                 colorscale="Viridis", hoverongaps=False,
                 hovertemplate=f"epoch %{{y}}, t = %{{x}}: {symbol} = %{{customdata:.3g}}<extra></extra>",
                 colorbar=dict(title=dict(text="log scale", side="right"), tickvals=ticks,
                               ticktext=[f"10{str(t).translate(SUPERSCRIPT)}" for t in ticks], thickness=12))
    title = f"Gradient {symbol}: {html.escape(label)}"
    layout = dict(height=height, margin=dict(l=60, r=10, t=40, b=40), uirevision=f"flow-{which}",
                  title=dict(text=title, font=dict(size=13), x=0, xanchor="left"),
                  xaxis=dict(title=dict(text=f"step t of {variable} (the loss is at t = {steps})"), dtick=5 if steps > 10 else 1),
                  yaxis=dict(title=dict(text="epoch"), type="category", autorange="reversed", nticks=12))
    return dict(data=[trace], layout=layout)


def sigma_figure(series: list[tuple[str, list[float], list[float]]], height: int = 240) -> dict:
    """sigma_max(W_hh) per epoch for each (label, epochs, sigmas), with 1 marked: above it a
    product of Jacobians can grow (tanh' <= 1 only damps it), well under it the gradient vanishes."""
    traces, values = [], [1.0]
    for label, epochs, sigmas in series:
        points = [(e, s) for e, s in zip(epochs, sigmas) if math.isfinite(s)]
        if not points:
            continue
        values += [s for _, s in points]
        traces.append(dict(type="scatter", x=[e for e, _ in points], y=[s for _, s in points], mode="lines",
                           name=html.escape(label)))
    top = max(values) * 1.15
    layout = dict(height=height, margin=dict(l=60, r=10, t=30, b=40), uirevision="sigma",
                  legend=dict(orientation="h", y=-0.3),
                  xaxis=dict(title=dict(text="epoch")),
                  yaxis=dict(title=dict(text="σ_max(W_hh)"), range=[0, top], rangemode="tozero"),
                  shapes=[dict(type="line", xref="paper", x0=0, x1=1, y0=1, y1=1, line=dict(color="red", dash="dash"))],
                  annotations=[dict(x=1, xref="paper", y=1, text="σ_max = 1", showarrow=False, xanchor="right",
                                    yanchor="bottom", font=dict(color="red", size=11))])
    return dict(data=traces, layout=layout)
