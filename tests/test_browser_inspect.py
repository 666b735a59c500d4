"""The Inspect page's step-through and hidden-state trajectory in Chromium: their charts paint,
Play walks the steps on its own timer (which AppTest never fires), and a typed passage redraws the
path. Reuses tests/test_browser.py's server and browser; screenshots go to artifacts/screenshots/.
"""
import re

from playwright.sync_api import expect

from test_browser import CHARTS_DRAWN, browser, no_traceback, open_page, page, server, shot  # noqa: F401

# a fresh server on a busy 2-core machine can take a while: wait on conditions, generously
SLOW = 90_000
POINTS = "document.querySelectorAll('[data-testid=stPlotlyChart] .scatterlayer path.point').length"


def open_tab(page, label: str, mark: str) -> None:
    """Click a tab and wait until its section has run and its charts have painted."""
    page.get_by_role("tab", name=label).click()
    expect(page.get_by_text(mark).first).to_be_visible(timeout=SLOW)
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=SLOW)
    page.wait_for_function(CHARTS_DRAWN, timeout=SLOW)


def test_step_through_plays_forward_then_shows_the_backward_pass(page, server):
    open_page(page, server, "inspect")
    open_tab(page, "Step through", "The scratch RNN, one step at a time")
    expect(page.get_by_text("Step 1 of 5:")).to_be_visible()
    expect(page.get_by_test_id("stPlotlyChart")).to_have_count(2)      # H_t's panels; O_t and softmax
    page.get_by_role("button", name="Play").click()
    expect(page.get_by_role("button", name="Pause")).to_be_visible(timeout=SLOW)
    expect(page.get_by_text("Step 5 of 5:")).to_be_visible(timeout=SLOW)   # one step a second, on its own
    expect(page.get_by_role("button", name="Play")).to_be_visible(timeout=SLOW)   # and it stops at the end
    page.wait_for_function(CHARTS_DRAWN, timeout=SLOW)
    shot(page, "inspect-step-forward")
    page.get_by_text("Backward", exact=True).click()
    expect(page.get_by_text("Clipping factor min(1, θ/‖g‖), θ = 1")).to_be_visible(timeout=SLOW)
    expect(page.get_by_test_id("stPlotlyChart")).to_have_count(2)      # the norms; the gradient's panels
    page.wait_for_function(CHARTS_DRAWN, timeout=SLOW)
    shot(page, "inspect-step-backward")
    no_traceback(page)


def test_trajectory_draws_the_typed_passage(page, server):
    open_page(page, server, "inspect")
    open_tab(page, "Hidden-state trajectory", "The two components explain")
    page.wait_for_function(f"() => {POINTS} >= 100", timeout=SLOW)        # a point per character of the default
    box = page.get_by_role("textbox", name=re.compile("Passage"))
    box.fill("the time machine")
    box.press("Control+Enter")
    expect(page.get_by_text("over these 16 characters", exact=False)).to_be_visible(timeout=SLOW)
    page.wait_for_function(f"() => {POINTS} === 16", timeout=SLOW)
    shot(page, "inspect-trajectory")
    no_traceback(page)
