"""A long job with the Train page open: resident memory and thread count of the app's server
before, during and after, and how long Stop takes.

    python bench/soak.py --minutes 20        # needs /usr/bin/chromium and Playwright

Prints one line per sample and a JSON summary. It reports; it does not pass or fail.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.appserver import app_server, CHROMIUM_FLAGS  # noqa: E402



def proc_status(pid: int) -> dict:
    """Resident memory (MB) and thread count of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1), "threads": int(fields["Threads"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--every", type=float, default=60, help="seconds between samples")
    args = ap.parse_args()
    samples = []

    def sample(label):
        row = {"t_s": round(time.monotonic() - t0, 1), "label": label} | proc_status(server.pid)
        samples.append(row)
        print(json.dumps(row), flush=True)

    t0 = time.monotonic()
    with app_server({"CHARRNN_CHECKPOINTS": tempfile.mkdtemp()}) as (server, url):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/train")
            page.wait_for_selector("[data-testid=stApp]")
            page.wait_for_timeout(2000)
            sample("page open, no job")
            box = page.get_by_role("spinbutton", name="Epochs", exact=True)
            box.fill("100000")
            box.press("Enter")
            page.wait_for_timeout(500)
            page.get_by_role("button", name="Start").click()
            expect(page.get_by_role("button", name="Stop")).to_be_enabled()
            page.wait_for_timeout(5000)
            sample("job running")
            end = time.monotonic() + args.minutes * 60
            while time.monotonic() < end:
                time.sleep(min(args.every, max(0.0, end - time.monotonic())))
                sample("job running")
            progress = page.get_by_test_id("stProgress").inner_text()
            t_stop = time.monotonic()
            page.get_by_role("button", name="Stop").click()
            expect(page.get_by_text("· stopped")).to_be_visible(timeout=30_000)
            stop_s = time.monotonic() - t_stop
            page.wait_for_timeout(3000)
            sample("after stop")
            browser.close()
    running = [s for s in samples if s["label"] == "job running"]
    print(json.dumps({"minutes": args.minutes, "progress_at_stop": progress, "stop_click_to_stopped_s": round(stop_s, 2),
                      "rss_mb": {"before": samples[0]["rss_mb"], "start_of_job": running[0]["rss_mb"],
                                 "end_of_job": running[-1]["rss_mb"], "after": samples[-1]["rss_mb"]},
                      "threads": {"before": samples[0]["threads"], "during": running[-1]["threads"],
                                  "after": samples[-1]["threads"]}}))


if __name__ == "__main__":
    main()
