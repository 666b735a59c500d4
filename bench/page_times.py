"""How long until a page's charts are drawn, in a real browser: the Inspect page on a fresh
server's first visit and after a warm navigation, and the Train page's chart after Start.

    python bench/page_times.py                 # 3 rounds of each
    python bench/page_times.py --rounds 5 --train-epochs 5

Each round starts a fresh `streamlit run app.py` and, on it, in new browser tabs:
(a) fresh: straight to /inspect; the time from the start of navigation until every visible
    Plotly chart on the page has drawn its SVG (`.main-svg`), and stays so until the run ends.
(b) warm: Home first (its chart drawn), then a click on Inspect in the sidebar; time from the click. Then Home and
    Inspect again in the same tab ("same tab again": plotly.js already loaded there).
(c) train: the Train page with Epochs set to --train-epochs (the other settings the page's
    defaults), a click on Start; time from the click until the live chart's SVG is visible.

Needs /usr/bin/chromium and Playwright. Prints a table (medians, min, max, every round) and one
JSON line. Times on a shared machine are noisy: compare medians of the same machine and load.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.appserver import CHROMIUM_FLAGS, app_server  # noqa: E402
from charrnn.kernels import build  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"

# Installed in every document before its own scripts: on every animation frame, note when the
# page last went from "some visible chart undrawn (or none)" to "every visible chart drawn", and
# when the Train chart's SVG was first visible; and the time of the last click.
MONITOR = """(() => {
  window.__m = {drawnAt: null, trainAt: null, clickAt: null, charts: 0};
  document.addEventListener('click', () => {
    window.__m.clickAt = performance.now(); window.__m.drawnAt = null; window.__m.trainAt = null;
  }, true);
  const visible = e => e.offsetParent !== null;
  const tick = () => {
    const m = window.__m, now = performance.now();
    const shown = [...document.querySelectorAll('[data-testid=stPlotlyChart], .charrnn-plot')].filter(visible);
    const drawn = shown.length > 0 && shown.every(e => e.querySelector('.main-svg'));
    m.charts = shown.length;
    if (!drawn) m.drawnAt = null; else if (m.drawnAt === null) m.drawnAt = now;
    if (m.trainAt === null && [...document.querySelectorAll('.charrnn-plot .main-svg')].some(visible)) m.trainAt = now;
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
})();"""
STATE = """() => ({...window.__m, now: performance.now(),
                 running: document.querySelectorAll('[data-testid=stStatusWidget]').length > 0})"""


def cpu_name() -> str:
    return build.cpu_info().summary()


def settled_drawn(page, settle_ms: float = 800, timeout_s: float = 90) -> float:
    """Wait until every visible chart has drawn, the script run has ended and nothing has changed
    for settle_ms; returns the page time (ms) at which the charts were all drawn."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = page.evaluate(STATE)
        if s["drawnAt"] is not None and not s["running"] and s["now"] - s["drawnAt"] >= settle_ms:
            return s["drawnAt"]
        time.sleep(0.05)
    page.screenshot(path=str(Path(tempfile.gettempdir()) / "page_times_timeout.png"), full_page=True)
    raise TimeoutError(f"charts not drawn within {timeout_s} s: {page.evaluate(STATE)}; "
                       f"screenshot in {tempfile.gettempdir()}/page_times_timeout.png")


def script_idle(page) -> None:
    page.wait_for_selector("[data-testid=stMainBlockContainer]")
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=90_000)


def new_page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(MONITOR)
    page = context.new_page()
    page.set_default_timeout(90_000)
    return context, page


def fresh_visit(browser, url: str) -> float:
    """Seconds from navigation start to every chart drawn, on /inspect."""
    context, page = new_page(browser)
    try:
        page.goto(f"{url}/inspect")
        return settled_drawn(page) / 1000          # performance.now() counts from navigation start
    finally:
        context.close()


def warm_visit(browser, url: str) -> tuple[float, float]:
    """Seconds from a click on Inspect in the sidebar to every chart drawn: in a new browser
    tab that opened Home first, then again in the same tab after going back to Home."""
    context, page = new_page(browser)
    times = []
    try:
        page.goto(url)
        script_idle(page)
        nav = page.get_by_test_id("stSidebarNav")
        for i in range(2):
            if i:
                nav.get_by_role("link", name="Home").click()
                expect(page.get_by_role("heading", name="charrnn")).to_be_visible()
                script_idle(page)
            if page.get_by_text("The shipped model (").count():   # Home's chart, drawn as its reader sees it
                page.wait_for_selector("[data-testid=stPlotlyChart] .main-svg")
            time.sleep(0.5)
            nav.get_by_role("link", name="Inspect").click()
            drawn = settled_drawn(page)
            times.append((drawn - page.evaluate("window.__m.clickAt")) / 1000)
    finally:
        context.close()
    return times[0], times[1]


def train_visit(browser, url: str, epochs: int) -> float:
    """Seconds from a click on Start to the Train page's chart SVG visible, on a server that has
    not trained yet (afterwards the page shows the ended runs' chart before any click)."""
    context, page = new_page(browser)
    try:
        page.goto(f"{url}/train")
        script_idle(page)
        epochs_box = page.get_by_role("spinbutton", name="Epochs", exact=True)
        epochs_box.fill(str(epochs))
        epochs_box.press("Enter")
        time.sleep(0.3)
        script_idle(page)
        start = page.get_by_role("button", name="Start")
        expect(start).to_be_enabled()
        if page.locator(".charrnn-plot").count():
            raise RuntimeError("the Train page shows a chart before Start")
        start.click()
        page.wait_for_function("window.__m.trainAt !== null", timeout=90_000)
        m = page.evaluate(STATE)
        expect(page.get_by_role("button", name="Start")).to_be_enabled(timeout=300_000)  # the run ended
        return (m["trainAt"] - m["clickAt"]) / 1000
    finally:
        context.close()


def summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3), "max": round(max(xs), 3),
            "runs": [round(x, 3) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="fresh servers, warm navigations and Train starts")
    ap.add_argument("--train-epochs", type=int, default=5)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install chromium")
    checkpoints = Path(tempfile.mkdtemp(prefix="page_times_"))
    shutil.copy(ROOT / "checkpoints" / "default.safetensors", checkpoints)
    env = {"CHARRNN_CHECKPOINTS": str(checkpoints), "CHARRNN_OFFLINE": "1"}
    shared = ROOT.parent / "shared" / "data"
    if "CHARRNN_DATA" not in os.environ and (shared / "timemachine.txt").exists():
        env["CHARRNN_DATA"] = str(shared)
    fresh, warm, again, train = [], [], [], []
    log = open(checkpoints / "streamlit.log", "w+")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            for _ in range(args.rounds):    # a fresh server each round
                with app_server(env, log=log) as (_, url):
                    fresh.append(fresh_visit(browser, url))
                    first, second = warm_visit(browser, url)
                    warm.append(first)
                    again.append(second)
                    if not args.skip_train:
                        train.append(train_visit(browser, url, args.train_epochs))
            browser.close()
    finally:
        log.close()
        shutil.rmtree(checkpoints, ignore_errors=True)
    result = {"cpu": cpu_name(), "rounds": args.rounds, "inspect_fresh_s": summary(fresh),
              "inspect_warm_s": summary(warm),
              "inspect_warm_again_s": summary(again)}
    if train:
        result["train_start_to_chart_s"] = summary(train) | {"epochs": args.train_epochs}
    print(f"CPU: {result['cpu']}")
    print(f"{'measure':<34}{'median':>8}{'min':>8}{'max':>8}  runs (s)")
    for name, key in [("Inspect, fresh server, first visit", "inspect_fresh_s"),
                      ("Inspect, warm navigation", "inspect_warm_s"),
                      ("Inspect, warm, same tab again", "inspect_warm_again_s"),
                      ("Train, Start to chart", "train_start_to_chart_s")]:
        if key in result:
            s = result[key]
            print(f"{name:<34}{s['median']:>8.2f}{s['min']:>8.2f}{s['max']:>8.2f}  {s['runs']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
