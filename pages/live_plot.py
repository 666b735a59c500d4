"""Plotly charts that redraw in place, for the Train page's live view.

    live_plot(figure, key="ppl")     # figure: a plain Plotly dict, {"data": [...], "layout": {...}}

st.plotly_chart rebuilds its chart through a React render on every rerun; at the live view's one
redraw a second that cost a headless Chromium nearly twice the CPU this component costs
(docs/performance.md), and on a small machine that comes out of training. This component keeps
one Plotly chart per key alive in the page and hands it each new figure with Plotly.react, which
redraws in place.

Plotly.js is the copy that ships inside the plotly Python package; it is copied to static/ beside
app.py (the folder is in git, the file is ignored) and served by Streamlit's static file serving
(.streamlit/config.toml). Where that copy cannot be made, or static serving is off, the charts
fall back to st.plotly_chart.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import plotly
import streamlit as st

STATIC = Path(__file__).resolve().parent.parent / "static"   # Streamlit serves it as /app/static/
PLOTLY_JS = "plotly.min.js"
# relative to the page (/train), so a server.baseUrlPath works too; the version makes a browser
# fetch the new file after plotly is upgraded
SCRIPT_URL = f"app/static/{PLOTLY_JS}?v={plotly.__version__}"

# Streamlit calls this function when the chart first mounts and again whenever its data (or the
# theme) changes; `parentElement` stays the same while the chart stays mounted, so the Plotly div
# is made once and updated after that. The page's font and text colour are applied, so the chart
# follows the light or dark theme as st.plotly_chart does. The function it returns runs when the
# chart unmounts (another page, or a rerun without it) and frees Plotly's div and listeners.
JS = f"""
export default function ({{ data, parentElement }}) {{
  if (!window.Plotly && !window.charrnnPlotly) {{
    window.charrnnPlotly = new Promise((resolve, reject) => {{
      const script = document.createElement("script");
      script.src = "{SCRIPT_URL}";
      script.onload = resolve;
      script.onerror = () => {{ window.charrnnPlotly = null; reject(); }};  // the next draw tries again
      document.head.appendChild(script);
    }});
    window.charrnnPlotly.catch(() => {{}});                 // a preload's failure is reported by the next draw
  }}
  if (!data) return;                                        // preload_plotly(): the script only
  let div = parentElement.querySelector("div.charrnn-plot");
  if (!div) {{
    div = document.createElement("div");
    div.className = "charrnn-plot";
    parentElement.appendChild(div);
  }}
  const draw = () => {{
    const style = getComputedStyle(parentElement);
    const font = {{ family: style.fontFamily, color: style.color, size: 13 }};
    const grid = "rgba(128, 128, 128, 0.2)";
    const clear = "rgba(0,0,0,0)";
    const layout = {{ ...data.layout, font, paper_bgcolor: clear, plot_bgcolor: clear, modebar: {{ bgcolor: clear }} }};
    for (const axis of ["xaxis", "yaxis"]) layout[axis] = {{ gridcolor: grid, zerolinecolor: grid, ...layout[axis] }};
    window.Plotly.react(div, data.data, layout, {{ displaylogo: false, responsive: true }});
  }};
  if (window.Plotly) draw();
  else window.charrnnPlotly.then(draw, () => {{ div.textContent = "The chart could not load plotly.js."; }});
  return () => window.Plotly?.purge(div);
}}
"""

_component = st.components.v2.component("charrnn_live_plot", js=JS, isolate_styles=False)


@functools.cache
def plotly_served() -> bool:
    """Put plotly.js where Streamlit serves static files, once per process. False if it cannot
    be, or if static serving is off (a command-line flag can turn it off)."""
    if not st.get_option("server.enableStaticServing"):
        return False
    source = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    target = STATIC / PLOTLY_JS
    tmp = None
    try:
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            return True
        STATIC.mkdir(exist_ok=True)
        with source.open("rb") as src:
            with tempfile.NamedTemporaryFile(dir=STATIC, prefix=".plotly-", delete=False) as out:
                tmp = Path(out.name)
                shutil.copyfileobj(src, out)
        tmp.chmod(0o644)
        os.replace(tmp, target)                     # atomic: another process never sees half a file
        return True
    except OSError:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False


def preload_plotly() -> None:
    """Have the browser fetch plotly.js now, before the first live chart needs it: a page that will
    draw one calls this first, so Start is followed by a chart rather than by the download."""
    if plotly_served():
        _component(data=None, key="plotly_preload", height="content")


def live_plot(figure: dict, key: str) -> None:
    """Draw `figure` (a Plotly dict) under `key`, updating the chart already there."""
    if plotly_served():
        _component(data=figure, key=key, height="content")
    else:
        st.plotly_chart(figure, width="stretch", key=key)
