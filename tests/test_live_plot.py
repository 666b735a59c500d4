"""The Train page's live charts (pages/live_plot.py): plotly.js put where Streamlit serves it, and
st.plotly_chart where it cannot be."""
import filecmp
from pathlib import Path

import plotly
import pytest

from pages import live_plot
from tests.test_app import app, chart_points, poll

SOURCE = Path(plotly.__file__).parent / "package_data" / live_plot.PLOTLY_JS


@pytest.fixture
def static(monkeypatch, tmp_path):
    def use(folder):
        monkeypatch.setattr(live_plot, "STATIC", folder)
        live_plot.plotly_served.cache_clear()
    yield use
    live_plot.plotly_served.cache_clear()


def test_plotly_js_is_copied_once(static, tmp_path):
    static(tmp_path / "static")
    assert live_plot.plotly_served()
    target = tmp_path / "static" / live_plot.PLOTLY_JS
    assert filecmp.cmp(target, SOURCE, shallow=False)
    assert [p.name for p in target.parent.iterdir()] == [live_plot.PLOTLY_JS]   # no temporary file left


def test_static_serving_off_falls_back(static, tmp_path):
    from streamlit import config
    static(tmp_path / "static")
    before = config.get_option("server.enableStaticServing")
    config.set_option("server.enableStaticServing", False)   # e.g. --server.enableStaticServing false
    try:
        assert not live_plot.plotly_served()
    finally:
        config.set_option("server.enableStaticServing", before)


def test_unwritable_static_folder_falls_back_to_st_plotly_chart(static, tmp_path, jobs, book):
    (tmp_path / "a-file").write_text("")
    static(tmp_path / "a-file" / "static")        # cannot be made
    assert not live_plot.plotly_served()
    at = app("train")
    at.selectbox(key="train_model").set_value("rnn").run()
    at.number_input(key="train_hidden_rnn").set_value(16)
    at.number_input(key="train_epochs").set_value(5)
    at.run()
    at.button(key="start").click().run()
    assert poll(at, lambda a: not jobs.running() and chart_points(a) >= 2)
    # perplexity, gradient norm, gradient flow (one run), sigma_max
    assert len(at.get("plotly_chart")) == 4 and not at.get("bidi_component")
    assert not at.exception and not at.error
