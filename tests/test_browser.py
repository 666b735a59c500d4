"""End-to-end: `streamlit run app.py` driven in Debian's Chromium through Playwright, as a person
would use it. Screenshots of every page land in artifacts/screenshots/ (git-ignored).

Needs /usr/bin/chromium (`apt-get install chromium`; .ci/run installs it). Playwright cannot
download browsers here, so it launches that executable.
"""
import re
import shutil
from pathlib import Path

import pytest
import torch
from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect, sync_playwright

from bench.appserver import CHROMIUM_FLAGS, app_server

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
# points of the first curve in the Train page's perplexity chart (Plotly keeps the data on the div)
LIVE_POINTS = "(document.querySelector('.charrnn-plot')?.data?.[0]?.x?.length ?? 0)"
# every Plotly chart shown on the page has drawn its SVG
CHARTS_DRAWN = """() => {
    const shown = [...document.querySelectorAll('[data-testid=stPlotlyChart], .charrnn-plot')]
        .filter(e => e.offsetParent !== null);
    return shown.length > 0 && shown.every(e => e.querySelector('.main-svg'));
}"""
# A slow or busy 2-core machine can take many seconds for a fresh server's first page: wait on
# conditions with generous timeouts, never on the clock.
expect.set_options(timeout=30_000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on 127.0.0.1 with its own checkpoints folder (the shipped model copied in)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    shutil.copy(ROOT / "checkpoints" / "default.safetensors", folder)
    env = {"CHARRNN_CHECKPOINTS": str(folder), "CHARRNN_OFFLINE": "1"}
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "w+")
    try:
        with app_server(env, log=log) as (_, url):
            yield {"url": url, "checkpoints": folder, "log": log}
    except RuntimeError as e:
        pytest.fail(str(e))
    log.seek(0)
    assert "Traceback" not in log.read(), "the server logged a traceback"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium).")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))     # uncaught exceptions in the page's scripts
    yield pg
    context.close()
    assert not errors, errors


def open_page(page, server, path=""):
    page.goto(f"{server['url']}/{path}")
    page.wait_for_selector("[data-testid=stApp]")
    page.wait_for_selector("[data-testid=stMainBlockContainer]")
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=30_000)  # the run finished


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def no_traceback(page):
    assert page.get_by_test_id("stException").count() == 0
    assert "Traceback" not in page.content()


def test_home(page, server):
    open_page(page, server)
    expect(page.get_by_role("heading", name="charrnn")).to_be_visible()
    expect(page.get_by_text("Hidden state.")).to_be_visible()
    shot(page, "home")
    no_traceback(page)


def test_train_start_watch_stop(page, server, book):
    open_page(page, server, "train")
    epochs = page.get_by_role("spinbutton", name="Epochs")
    epochs.fill("300")
    epochs.press("Enter")
    page.get_by_role("button", name="Start").click()
    # the live chart (pages/live_plot.py) appears and grows while the run trains
    expect(page.locator(".charrnn-plot .main-svg").first).to_be_visible(timeout=60_000)
    page.wait_for_function(  # the progress line reads "... — epoch N / 300 · ..." with N >= 3
        "() => { const m = document.body.innerText.match(/epoch (\\d+) \\/ 300/); return m && +m[1] >= 3; }",
        timeout=60_000)
    page.wait_for_function(LIVE_POINTS + " >= 3", timeout=30_000)
    page.wait_for_function(CHARTS_DRAWN)
    # the gradient flow through time: a heatmap painted, titled with the word "Gradient"
    expect(page.locator(".charrnn-plot .hm image").first).to_be_attached(timeout=60_000)
    expect(page.locator(".charrnn-plot .gtitle", has_text="Gradient").first).to_be_visible()
    shot(page, "train")
    progress = page.get_by_test_id("stProgress").inner_text()
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_text("stopped")).to_be_visible()
    expect(page.get_by_role("button", name="Save")).to_be_visible()
    assert "epoch" in progress
    no_traceback(page)


def test_generate(page, server):
    open_page(page, server, "generate")
    prefix = page.get_by_role("textbox", name="Prefix")
    prefix.fill("the time machine")
    prefix.press("Enter")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("Highlighted: the prefix")).to_be_visible()
    expect(page.locator("[data-testid=stPlotlyChart]")).to_have_count(1)
    shot(page, "generate")
    no_traceback(page)


def test_inspect(page, server):
    open_page(page, server, "inspect")
    expect(page.get_by_role("heading", name="Inspect")).to_be_visible()
    expect(page.get_by_text("(5, 2, 28)").first).to_be_visible()
    expect(page.locator("[data-testid=stPlotlyChart]").first).to_be_visible()
    expect(page.get_by_text("(10, 28)").first).to_be_attached()
    page.wait_for_function(CHARTS_DRAWN)             # the heatmaps have painted
    shot(page, "inspect")
    no_traceback(page)


def settled(page, filename):
    """The rerun that reads the uploaded `filename` has finished: the page says how long the text
    is (the uploader's chip shows before the upload ends; a click during that rerun would be
    overtaken by it)."""
    expect(page.get_by_text(f"{filename}: ", exact=False)).to_be_visible()
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)


def test_train_on_uploads_bad_and_good(page, server, tmp_path):
    open_page(page, server, "train")
    page.get_by_text("Upload a .txt", exact=True).click()
    dropzone = page.locator("[data-testid=stFileUploaderDropzoneInput]")
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)) * 4)
    dropzone.set_input_files(str(binary))
    expect(page.get_by_text("looks like a binary file")).to_be_visible()
    short = tmp_path / "short.txt"
    short.write_text("Far too short to fill one batch.")
    dropzone.set_input_files(str(short))
    settled(page, "short.txt")
    expect(page.get_by_role("button", name="Start")).to_be_enabled()
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_text("fewer than one batch")).to_be_visible()
    good = tmp_path / "mine.txt"
    good.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    dropzone.set_input_files(str(good))
    settled(page, "mine.txt")
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_text("· mine.txt —")).to_be_visible(timeout=60_000)   # the run's label names its text
    expect(page.locator(".charrnn-plot .main-svg").first).to_be_visible(timeout=60_000)
    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_text("· stopped")).to_be_visible()
    shot(page, "train-upload")
    no_traceback(page)


def test_generate_adds_an_uploaded_checkpoint(page, server, tmp_path):
    """Random bytes named .safetensors are one sentence; a real checkpoint lands in checkpoints/."""
    open_page(page, server, "generate")
    page.get_by_text("Add a checkpoint from a file").click()
    dropzone = page.locator("[data-testid=stFileUploaderDropzoneInput]")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(256)) * 16)
    dropzone.set_input_files(str(noise))
    expect(page.get_by_text("not a readable checkpoint")).to_be_visible()
    mine = tmp_path / "shared-run.safetensors"
    shutil.copy(server["checkpoints"] / "default.safetensors", mine)
    dropzone.set_input_files(str(mine))
    expect(page.get_by_text("pick it under Model")).to_be_visible()
    from charrnn.checkpoint import load_checkpoint      # re-saved from the checked model: the same weights
    added, original = load_checkpoint(server["checkpoints"] / "shared-run.safetensors"), load_checkpoint(mine)
    assert all(torch.equal(a, b) for a, b in zip(added.model.state_dict().values(), original.model.state_dict().values()))
    assert not (server["checkpoints"] / "noise.safetensors").exists()
    no_traceback(page)


def test_save_continue_and_compare(page, server, book):
    """Train a small run from a link, save it, continue the checkpoint picked from the list, and
    compare the two runs in the table: a row selected is what the chart draws beside the last run."""
    open_page(page, server, "train?model=rnn&hidden=16&epochs=3&max_tokens=2000")
    page.get_by_role("button", name="Start").click()
    expect(page.get_by_text("· finished")).to_be_visible(timeout=60_000)
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.get_by_text("It is now in the Generate and Inspect pages")).to_be_visible()
    saved = page.get_by_role("textbox", name="Checkpoint name").input_value()
    section = page.get_by_test_id("stExpander").filter(has_text="Continue a saved checkpoint")
    section.get_by_text("Continue a saved checkpoint").click()
    expect(section.get_by_role("combobox", name="Checkpoint")).to_have_value(re.compile(f"^{saved} — rnn-16, 3 epochs"))
    more = section.get_by_role("spinbutton", name="More epochs")
    more.fill("2")
    more.press("Enter")
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)
    section.get_by_role("button", name="Continue").click()
    expect(page.get_by_text(f"{saved} continues as {saved} (continued)")).to_be_visible()
    expect(page.get_by_text(f"{saved} (continued) — epoch 5 / 5")).to_be_visible(timeout=60_000)
    expect(page.get_by_text("· finished")).to_be_visible(timeout=60_000)
    table = page.get_by_test_id("stDataFrame")
    expect(table).to_be_visible()
    runs = lambda: [t for t in page.locator(".charrnn-plot").first.locator(".legendtext").evaluate_all(
        "texts => texts.map(t => t.textContent)") if "-gram" not in t]     # not the n-gram baselines
    page.wait_for_function(CHARTS_DRAWN)
    shown = {t.split(" · ")[0] for t in runs()}               # none selected: all (earlier tests' runs too)
    assert f"{saved} (continued)" in shown and len(shown) >= 2
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)   # the rerun after the run's end is over
    only_one = """() => [...document.querySelectorAll('.charrnn-plot')[0].querySelectorAll('.legendtext')]
                     .filter(t => !t.textContent.includes('-gram')).length === 2"""
    for attempt in range(3):                 # a click while the grid is still being laid out can be lost
        table.scroll_into_view_if_needed()  # a mouse click lands only inside the viewport
        box = table.bounding_box()           # the grid is a canvas: the last row's selection box, under the header
        page.mouse.click(box["x"] + 18, box["y"] + 35 + 35 * (len(shown) - 1) + 17)
        try:
            page.wait_for_function(only_one, timeout=15_000)
            break
        except PlaywrightTimeout:
            expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)
            assert len(runs()) > 2, "the selection came late and a second click undid it"
    else:
        pytest.fail("selecting the row never limited the chart to it")
    assert {t.split(" · ")[0] for t in runs()} == {f"{saved} (continued)"}
    shot(page, "train-compare")
    no_traceback(page)
