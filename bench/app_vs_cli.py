"""How much slower does training run in the app, with the Train page open and redrawing, than in
the CLI? Alternates the two, same settings, and prints both tokens/s and their ratio.

    python bench/app_vs_cli.py --epochs 150 --rounds 5      # needs /usr/bin/chromium and Playwright
    python bench/app_vs_cli.py --epochs 150 --rounds 5 --closed   # the page closed while it trains
    python bench/app_vs_cli.py --epochs 150 --rounds 5 --cli-threads 1   # the CLI on one thread

An epoch of the seed's 10,000 tokens takes a tenth of a second or less on a fast CPU, so give a
round enough epochs that the page's start and end do not dominate it.

The app side: `streamlit run app.py`, a headless Chromium on the Train page, Start with the page's
defaults (its "CPU threads" come from charrnn.kernels.app_threads), wait until the run ends, Save;
tokens/s is read from the saved checkpoint (training time only, as the CLI's).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.appserver import CHROMIUM_FLAGS, app_server  # noqa: E402
from charrnn.checkpoint import read_metadata  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cli_run(epochs: int, threads: int) -> float:
    out = subprocess.run([sys.executable, "-m", "charrnn", "train", "--epochs", str(epochs), "--threads", str(threads),
                          "--json", "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def browser_cpu_seconds() -> float:
    """CPU seconds used so far by the Chromium processes this script started (Linux /proc)."""
    parent, proc = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        parent[int(pid)], proc[int(pid)] = int(rest[1]), (name, int(rest[11]) + int(rest[12]))  # utime + stime
    ours, grown = set(), {os.getpid()}
    while grown != ours:                 # this process and its descendants, whatever their pid order
        ours, grown = grown, grown | {pid for pid, ppid in parent.items() if ppid in grown}
    ticks = sum(proc[pid][1] for pid in ours if "chrom" in proc[pid][0])
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_quietly(locator, timeout: float, every: float = 3.0) -> None:
    """Wait until `locator` is visible, looking every `every` seconds. Playwright's expect() looks
    up to ten times a second, each a search of the whole page, and that costs the browser about a
    tenth of a core: more than the page itself costs a user between its redraws."""
    deadline = time.monotonic() + timeout
    while not locator.first.is_visible():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{locator} not visible after {timeout:.0f} s")
        time.sleep(every)


def app_run(browser, url: str, epochs: int, name: str, run: int, closed: bool) -> tuple[float, float]:
    """(tokens/s of the app's run, Chromium's CPU use meanwhile in cores)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{url}/train")
    page.wait_for_selector("[data-testid=stApp]")
    box = page.get_by_role("spinbutton", name="Epochs", exact=True)
    box.fill(str(epochs))
    box.press("Enter")
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=30_000)
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_role("button", name="Stop")).to_be_enabled(timeout=30_000)
    expect(page.get_by_text(f"run{run} · ").first).to_be_visible()
    t0, cpu0 = time.monotonic(), browser_cpu_seconds()
    if closed:  # no browser while it trains: only the server's own cost remains
        page.close()
        time.sleep(epochs * 0.1)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/train")
        page.wait_for_selector("[data-testid=stApp]")
    # this run's progress line at its end (a fresh page shows the last run's until its first redraw)
    wait_quietly(page.get_by_test_id("stProgress").filter(has_text=f"run{run} · ")
                 .filter(has_text=f"epoch {epochs} / {epochs}").filter(has_text="· finished"), timeout=epochs * 10.0)
    browser_cores = (browser_cpu_seconds() - cpu0) / (time.monotonic() - t0)
    expect(page.get_by_role("button", name="Save")).to_be_visible()      # the full rerun after the end
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=30_000)
    box = page.get_by_role("textbox", name="Checkpoint name")
    box.fill(name)
    box.press("Enter")
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=30_000)
    page.get_by_role("button", name="Save").click()
    saved = page.get_by_text(re.compile(r"Saved .*\.safetensors")).first
    expect(saved).to_be_visible()
    path = re.search(r"Saved (.*\.safetensors)", saved.inner_text()).group(1)  # the name box may have been reset
    page.close()
    return read_metadata(path)["metrics"]["tokens_per_s"], browser_cores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--closed", action="store_true", help="close the page while the app trains")
    ap.add_argument("--cli-threads", type=int, default=0,
                    help="the CLI's --threads (default 0: all cores, its default; the app leaves one core free)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    cli, app, cores = [], [], []
    with app_server({"CHARRNN_CHECKPOINTS": str(folder)}) as (_, url), sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS)
        for r in range(args.rounds):
            cli.append(cli_run(args.epochs, args.cli_threads))
            tokens_per_s, browser_cores = app_run(browser, url, args.epochs, f"bench{r}", r + 1, args.closed)
            app.append(tokens_per_s)
            cores.append(browser_cores)
            print(f"round {r + 1}: cli {cli[-1]:,.0f} tokens/s, app {app[-1]:,.0f} tokens/s "
                  f"({app[-1] / cli[-1]:.2f}), Chromium {browser_cores:.2f} cores meanwhile", flush=True)
        browser.close()
    c, a = statistics.median(cli), statistics.median(app)
    print(json.dumps({"epochs": args.epochs, "page": "closed" if args.closed else "open", "cli_threads": args.cli_threads or "all",
                      "cli_tokens_per_s": c, "app_tokens_per_s": a,
                      "app_over_cli": round(a / c, 3),   # the ratio of the two medians
                      "median_round_ratio": round(statistics.median(x / y for x, y in zip(app, cli)), 3),
                      "browser_cores": round(statistics.median(cores), 3)}))


if __name__ == "__main__":
    main()
