"""The Inspect page through streamlit's AppTest: it renders for every model kind, its shapes follow
the widgets, and odd inputs give a sentence, never an exception.

The page's sections are lazy tabs (st.tabs with on_change="rerun", key "inspect_tab"): a run draws
the open one only. AppTest has no tab click, so a test opens a section by setting that key in the
session, as the browser's click does; test_tabs_in_a_browser clicks the real tabs."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import _find_book

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def at(jobs):
    """The app on the Inspect page, with only the shipped checkpoint to pick from (no runs of
    earlier tests either: `jobs` empties the app's registry)."""
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    app.run()
    app.switch_page("pages/inspect.py")
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def text_of(app) -> str:
    """Everything the page wrote as code, Markdown, tables, alerts and HTML, as one string."""
    parts = [c.value for c in app.code] + [m.value for m in app.markdown] + [c.value for c in app.caption]
    parts += [t.value.to_string() for t in app.table] + [h.value for h in app.html]
    parts += [a.value for a in (*app.info, *app.warning)] + [f"{m.label}={m.value}" for m in app.metric]
    return "\n".join(parts)


def rerun(app):
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    return text_of(app)


TABS = ["Worked example", "Shape trace", "Concatenation", "Inside a trained model", "Perplexity",
        "Step through", "Hidden-state trajectory", "Gradient flow"]


def open_tab(app, label: str) -> str:
    """Open a section, as a click on its tab does, and return the page's text."""
    assert label in TABS
    app.session_state["inspect_tab"] = label
    return rerun(app)


def test_the_seeds_worked_example(at):
    page = text_of(at)
    assert at.title[0].value == "Inspect"
    assert "F.one_hot(X.T, 28).shape   # (5, 2, 28)" in page
    assert "Y.shape              # (10, 28)" in page
    assert "len(new_state)       # 1" in page and "new_state[0].shape   # (2, 512)" in page
    assert "10 = 5 × 2 = steps × batch" in page
    # the concise example
    assert "rnn_layer = nn.RNN(28, 256)" in page
    assert "Y.shape           # (35, 32, 256)" in page and "state_new.shape   # (1, 32, 256)" in page
    # the shape trace and the parameter table of the same model
    page = open_tab(at, "Shape trace")
    assert "(10, 28)" in at.table[0].value.to_string()
    params = at.table[1].value
    assert list(params["shape"]) == ["(28, 512)", "(512, 512)", "(512,)", "(512, 28)", "(28,)"]
    assert "Total: 291,356 parameters" in page
    # the concatenation identity
    page = open_tab(at, "Concatenation")
    assert "(3, 1)(1, 4) + (3, 4)(4, 4)" in page and "(3, 5)(5, 4)" in page
    assert float(next(m.value for m in at.metric if m.label == "Largest absolute difference")) < 1e-5


@pytest.mark.parametrize("kind, state_lines", [
    ("scratch", ["len(new_state)       # 1", "new_state[0].shape   # (3, 512)"]),
    ("rnn", ["new_state.shape      # (1, 3, 512)"]),
    ("gru", ["new_state.shape      # (1, 3, 512)"]),
    ("lstm", ["len(new_state)       # 2", "new_state[0].shape   # (1, 3, 512)",
              "new_state[1].shape   # (1, 3, 512)"]),
])
def test_every_kind_and_the_shapes_follow(at, kind, state_lines):
    before = text_of(at)
    assert "(5, 2, 28)" in before and "(4, 3, 28)" not in before
    at.selectbox(key="inspect_kind").set_value(kind)
    at.number_input(key="inspect_batch").set_value(3)
    at.number_input(key="inspect_steps").set_value(4)
    page = rerun(at)
    assert "F.one_hot(X.T, 28).shape   # (4, 3, 28)" in page and "(5, 2, 28)" not in page
    assert "Y.shape              # (12, 28)" in page and "12 = 4 × 3 = steps × batch" in page
    for line in state_lines:
        assert line in page
    page = open_tab(at, "Shape trace")          # the worked example's model and batch, its tab closed
    assert "The model and batch of the worked example: " + {"scratch": "scratch RNN", "rnn": "nn.RNN", "gru": "nn.GRU",
                                                            "lstm": "nn.LSTM"}[kind] in page
    trace = at.table[0].value
    assert trace.loc[trace["stage"] == "logits Y\\_hat", "shape"].item() == "(12, 28)"
    assert trace.loc[trace["stage"] == "outputs stacked", "shape"].item() == "(4, 3, 512)"


def test_bidirectional_layers_and_bad_combinations(at):
    at.toggle(key="inspect_bidir").set_value(True)
    at.number_input(key="inspect_layers").set_value(2)
    page = rerun(at)  # scratch: one unidirectional layer, said in a sentence
    assert any("one unidirectional layer" in i.value for i in at.info)
    assert "new_state[0].shape   # (2, 512)" in page
    at.selectbox(key="inspect_kind").set_value("lstm")
    page = rerun(at)
    assert not any("one unidirectional layer" in i.value for i in at.info)
    assert "net = RNNModel(nn.LSTM(28, 512, num_layers=2, bidirectional=True), vocab_size=28)" in page
    assert "new_state[0].shape   # (4, 2, 512)" in page  # directions × layers = 4
    open_tab(at, "Shape trace")
    assert at.table[0].value.loc[lambda t: t["stage"] == "outputs stacked", "shape"].item() == "(5, 2, 1024)"


def test_concise_layer_follows_its_widgets(at):
    at.selectbox(key="inspect_layer_kind").set_value("lstm")
    at.number_input(key="inspect_layer_hidden").set_value(64)
    at.toggle(key="inspect_layer_bidir").set_value(True)
    page = rerun(at)
    assert "rnn_layer = nn.LSTM(28, 64, bidirectional=True)" in page
    assert "Y.shape           # (35, 32, 128)" in page
    assert "state_new[0].shape   # (2, 32, 64)" in page and "state_new[1].shape   # (2, 32, 64)" in page


def test_inside_the_shipped_model_and_unit_17(at):
    page = open_tab(at, "Perplexity")
    assert "default" in at.selectbox(key="inspect_model").value
    ppl = float(next(m.value for m in at.metric if m.label == "This text"))
    assert 1 <= ppl < 5  # the shipped model knows this sentence; uniform guessing would be 28
    page = open_tab(at, "Inside a trained model")
    unit = at.selectbox(key="inspect_unit")
    assert unit.options[0].startswith(f"unit {unit.value} — variance")  # the largest variance first
    assert f"unit {unit.value}'s activation" in page
    at.selectbox(key="inspect_unit").set_value(17)
    page = rerun(at)
    assert "Unit 17 is highest after" in page and "unit 17's activation" in page
    assert page.count("background:rgb(") > 100  # a coloured span per character


def test_odd_texts(at):
    open_tab(at, "Inside a trained model")
    at.text_area(key="inspect_text").set_value("")
    rerun(at)
    assert any("Type a text" in i.value for i in at.info)
    open_tab(at, "Perplexity")
    assert not [m for m in at.metric if m.label == "This text"]
    assert any("type at least two characters" in i.value for i in at.info)
    open_tab(at, "Inside a trained model")
    at.text_area(key="inspect_text").set_value("T")
    rerun(at)
    assert any("at least two" in i.value for i in at.info)
    at.text_area(key="inspect_text").set_value("The Time Machine, 1895")
    rerun(at)
    assert any("<unk>" in w.value and "','" in w.value for w in at.warning)
    page = open_tab(at, "Perplexity")
    assert [m for m in at.metric if m.label == "This text"]
    assert "“The Time Machine, 1895” (22 characters)" in page


def test_untrained_model_is_near_uniform(at):
    open_tab(at, "Inside a trained model")
    at.selectbox(key="inspect_model").set_value(next(o for o in at.selectbox(key="inspect_model").options
                                                     if o.startswith("Untrained")))
    rerun(at)
    open_tab(at, "Perplexity")                  # the model picked in the other tab
    assert at.selectbox(key="inspect_model").value.startswith("Untrained")
    ppl = float(next(m.value for m in at.metric if m.label == "This text"))
    assert 20 < ppl < 36  # random weights: about as unsure as 28 equally likely tokens


def test_long_text_window_survives_a_shorter_text(at):
    open_tab(at, "Inside a trained model")
    at.text_area(key="inspect_text").set_value("the time machine is a novel " * 40)
    rerun(at)
    at.slider(key="inspect_window").set_value(1000)
    page = rerun(at)
    assert "characters 1000 to 1119 of 1120" in page
    at.text_area(key="inspect_text").set_value("the time machine is a novel " * 6)  # 168 characters
    page = rerun(at)
    start, end = map(int, re.search(r"characters (\d+) to (\d+) of 168;", page).groups())
    assert 0 <= start <= 48 and end == start + 119  # a full window inside the text
    guesses = next(h.value for h in at.html if "width:46px" in h.value)
    assert guesses.count("width:46px") == 120  # a full window of characters, not an empty one


def onehot_figure(app) -> dict:
    """The worked example's one-hot heatmaps, as the figure the browser receives."""
    specs = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    return next(f for f in specs if any("one_hot(X.T[0])" in a.get("text", "") for a in f["layout"]["annotations"]))


def test_onehot_columns_are_labelled_with_the_vocabulary(at):
    """Every step's heatmap names its columns: the token of each one-hot index, all 28, upright."""
    for steps, batch in [(5, 2), (3, 4), (1, 1)]:         # one step: one heatmap, no gap to leave
        at.number_input(key="inspect_steps").set_value(steps)
        at.number_input(key="inspect_batch").set_value(batch)
        rerun(at)
        figure = onehot_figure(at)
        axes = [v for k, v in figure["layout"].items() if k.startswith("xaxis")]
        assert len(axes) == steps == len(figure["data"])         # one heatmap, and one labelled axis, per step
        for axis in axes:
            assert axis["tickmode"] == "array" and axis["showticklabels"] and axis["tickangle"] == 0
            assert axis["tickvals"] == list(range(28))
            labels = axis["ticktext"]
            assert labels[:2] == ["<unk>", "␣"] and set(labels[2:]) == set("abcdefghijklmnopqrstuvwxyz")
        for trace in figure["data"]:
            assert trace["x"] == list(range(28)) and len(trace["z"]) == batch
            assert trace["customdata"] == [labels] * batch         # the hover names the token too


SECTIONS = {  # the subheader each section starts with, and its Plotly charts
    "Worked example": ("One-hot encoding of a (batch, steps) batch", 1),
    "Shape trace": ("Every stage of one forward pass", 0),
    "Concatenation": ("X W_xh + H W_hh = cat(X, H) cat(W_xh, W_hh)", 0),
    "Inside a trained model": ("The text as one-hot vectors", 3),
    "Perplexity": ("Perplexity, explained by numbers", 0),
    "Step through": ("The scratch RNN, one step at a time", 2),
    "Hidden-state trajectory": ("Hidden-state trajectory", 1),
    # the shipped and an untrained model probed on the book, and the shipped one's sigma_max by epoch
    "Gradient flow": ("Gradient flow through time", 3),
}


@pytest.mark.parametrize("label", TABS)
def test_each_section_runs_alone(at, label):
    """Opening a tab runs its section and no other: its heading and charts, none of the others'."""
    open_tab(at, label)
    headings = [h.value for h in at.subheader]
    heading, charts = SECTIONS[label]
    if label == "Gradient flow" and _find_book() is None:
        charts = 2              # the shipped model's saved probes and sigma_max; the untrained one needs the book
    assert heading in headings
    assert not [h for other, (h, _) in SECTIONS.items() if other != label and h in headings]
    assert len(at.get("plotly_chart")) == charts


def test_widgets_keep_their_values_while_their_tab_is_closed(at):
    at.selectbox(key="inspect_kind").set_value("gru")
    at.number_input(key="inspect_steps").set_value(7)
    rerun(at)
    for label in TABS[1:]:
        open_tab(at, label)
    open_tab(at, "Inside a trained model")
    at.text_area(key="inspect_text").set_value("a short text")
    rerun(at)
    page = open_tab(at, "Worked example")
    assert at.selectbox(key="inspect_kind").value == "gru" and at.number_input(key="inspect_steps").value == 7
    assert "F.one_hot(X.T, 28).shape   # (7, 2, 28)" in page
    page = open_tab(at, "Inside a trained model")
    assert at.text_area(key="inspect_text").value == "a short text"


def test_perplexity_quotes_the_text_as_typed(at):
    """The perplexity tab quotes the text it scores; Markdown or LaTeX in it is not rendered."""
    open_tab(at, "Inside a trained model")
    at.text_area(key="inspect_text").set_value("a *bold* $x$ text")
    rerun(at)
    open_tab(at, "Perplexity")
    assert any("“a \\*bold\\* \\$x\\$ text” (17 characters)" in c.value for c in at.caption)


# -----------------------------------------------------------------------------
# the step-through and the trajectory

def save_model(folder: Path, name: str, kind: str, layers: int = 1, bidirectional: bool = False,
               hidden: int = 16) -> str:
    """An untrained model of `kind` saved as a checkpoint (the shipped one's metadata, its model
    replaced); returns its label in the model picker's options."""
    from dataclasses import asdict
    from charrnn import inspection as ins
    from charrnn.checkpoint import read_metadata, save_checkpoint
    from charrnn.models import ModelConfig
    config = ModelConfig(kind, 28, hidden, layers, bidirectional)
    meta = read_metadata(ROOT / "checkpoints" / "default.safetensors")
    meta |= {"model": asdict(config), "metrics": {"epochs": 0}, "resume": None}
    save_checkpoint(folder / name, ins.demo_model(config), meta)
    return f"{name} — {kind}-{hidden}, 0 epochs"


def figure(app, title_part: str) -> dict:
    """The Plotly figure one of whose panel titles contains `title_part`, as the browser gets it."""
    specs = [json.loads(c.proto.spec) for c in app.get("plotly_chart")]
    return next(f for f in specs if any(title_part in a.get("text", "") for a in f["layout"].get("annotations", [])))


def shipped_steps():
    from charrnn import inspection as ins
    from charrnn.checkpoint import load_checkpoint
    model = load_checkpoint(ROOT / "checkpoints" / "default.safetensors").model
    return ins.step_through(model, ins.seed_onehot_example().X)


def test_step_through_forward_shows_the_numbers_and_plays(at):
    page = open_tab(at, "Step through")
    assert "default" in at.selectbox(key="inspect_step_model").value
    assert "X = torch.arange(10).reshape((2, 5))" in page and "Y = (X + 1) % 28" in page
    assert "the first 32 of 512 hidden units" in page
    assert at.slider(key="inspect_step").value == 1 and "Step 1 of 5:" in page
    s = shipped_steps()
    fig = figure(at, "tanh")
    heat = [d for d in fig["data"] if d["type"] == "heatmap"]
    assert [len(h["z"][0]) for h in heat] == [28, 32, 32, 32, 32]       # X_t over the vocabulary, then 32 units
    assert heat[0]["z"] == s.onehot[0].tolist()
    assert heat[1]["customdata"][0] == [str(u) for u in range(32)]
    for panel, values in zip(heat[1:], (s.XW, s.HW, s.pre, s.H)):       # the real numbers, step 1
        torch.testing.assert_close(torch.tensor(panel["z"]), values[0, :, :32], rtol=1e-4, atol=1e-5)
    out = figure(at, "softmax")
    probs = next(d for d in out["data"] if d["type"] == "heatmap" and d["yaxis"] == "y2")
    torch.testing.assert_close(torch.tensor(probs["z"]), s.P[0], rtol=1e-4, atol=1e-6)
    marks = [d for d in out["data"] if d["type"] == "scatter"]
    assert all(m["x"] == s.Y[:, 0].tolist() for m in marks)             # □ on the targets
    at.slider(key="inspect_step").set_value(3)
    page = rerun(at)
    assert "Step 3 of 5:" in page
    torch.testing.assert_close(torch.tensor(figure(at, "tanh")["data"][4]["z"]), s.H[2, :, :32], rtol=1e-4, atol=1e-5)
    # Play: its click's run shows where it starts; each timer tick (a run here) moves one step
    at.button(key="inspect_play").click()
    page = rerun(at)
    assert at.button(key="inspect_play").label == "⏸ Pause" and "Step 3 of 5:" in page
    assert "Step 4 of 5:" in rerun(at)
    assert "Step 5 of 5:" in rerun(at)
    rerun(at)                                   # past the end: the timer stops
    assert at.button(key="inspect_play").label == "▶ Play" and at.slider(key="inspect_step").value == 5
    at.button(key="inspect_play").click()       # at the end: Play starts again from step 1
    assert "Step 1 of 5:" in rerun(at)
    at.button(key="inspect_play").click()       # Pause
    rerun(at)
    assert at.button(key="inspect_play").label == "▶ Play" and "Step 1 of 5:" in rerun(at)


def test_step_through_backward_and_clipping(at):
    open_tab(at, "Step through")
    at.radio(key="inspect_step_pass").set_value("Backward")
    page = rerun(at)
    assert at.slider(key="inspect_step").value == 5        # the backward pass starts at the last step
    s = shipped_steps()
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["Loss"]) == pytest.approx(s.loss, abs=1e-3)
    assert float(metrics["Gradient norm ‖g‖"]) == pytest.approx(s.grad_norm, rel=1e-3)
    assert float(metrics["Clipping factor min(1, θ/‖g‖), θ = 1"]) == pytest.approx(min(1, 1 / s.grad_norm), rel=1e-3)
    assert s.grad_norm > 1 and "so every gradient is multiplied by θ/‖g‖" in page
    params = at.table[0].value
    assert list(params["shape"]) == ["(28, 512)", "(512, 512)", "(512,)", "(512, 28)", "(28,)"]
    norms = json.loads(next(c.proto.spec for c in at.get("plotly_chart") if "gradient flowing back" in c.proto.spec))
    assert norms["data"][0]["x"] == ["t = 5", "t = 4", "t = 3", "t = 2", "t = 1"]   # in the order backprop visits
    assert norms["data"][0]["y"] == pytest.approx(s.dH_norm.flip(0).tolist(), rel=1e-5)
    assert "nothing, step 5 is the last" in figure(at, "their sum")["layout"]["annotations"][2]["text"]
    at.slider(key="inspect_step").set_value(2)
    rerun(at)
    heat = figure(at, "their sum")["data"]
    dH = next(d for d in heat if d["type"] == "heatmap" and d["yaxis"] == "y4")
    torch.testing.assert_close(torch.tensor(dH["z"]), s.dH[1, :, :32], rtol=1e-4, atol=1e-9)


def test_step_through_untrained_and_other_kinds(at, ckpt_dir):
    label = save_model(ckpt_dir, "lstm16", "lstm")
    open_tab(at, "Step through")
    untrained = next(o for o in at.selectbox(key="inspect_step_model").options if o.startswith("Untrained"))
    at.selectbox(key="inspect_step_model").set_value(untrained)
    assert "the first 32 of 512 hidden units" in rerun(at)   # the seed's size first
    at.number_input(key="inspect_step_hidden").set_value(8)
    page = rerun(at)
    assert "all 8 hidden units" in page
    assert len(figure(at, "tanh")["data"][4]["z"][0]) == 8
    at.radio(key="inspect_step_pass").set_value("Backward")
    rerun(at)
    assert {m.label: m.value for m in at.metric}["Clipping factor min(1, θ/‖g‖), θ = 1"] == "1"  # small weights
    at.selectbox(key="inspect_step_model").set_value(label)
    rerun(at)
    assert any("only scratch checkpoints" in i.value for i in at.info)
    assert not at.get("plotly_chart")


@pytest.mark.parametrize("kind, layers, bidirectional", [("rnn", 1, False), ("gru", 2, False), ("lstm", 2, True)])
def test_trajectory_every_kind(at, ckpt_dir, kind, layers, bidirectional):
    label = save_model(ckpt_dir, f"{kind}-model", kind, layers, bidirectional)
    open_tab(at, "Hidden-state trajectory")
    at.selectbox(key="inspect_model").set_value(label)
    page = rerun(at)
    assert ("forward direction's half" in page) == bidirectional
    path = figure_of(at)
    assert len(path["x"]) == len(path["text"]) == len(SEED_TEXT)
    assert "lines" in path["mode"] and "markers" in path["mode"]
    assert len(set(path["marker"]["color"])) > 5                # coloured by character
    e1, e2 = map(float, re.search(r"explain ([\d.]+)% and ([\d.]+)% of the variance", page).groups())
    assert 0 <= e2 <= e1 <= 100


def figure_of(at) -> dict:
    """The trajectory's path trace."""
    spec = json.loads(next(c.proto.spec for c in at.get("plotly_chart")))
    return spec["data"][0]


SEED_TEXT = ("the time traveller for so it will be convenient to speak of him was expounding "
             "a recondite matter to us")


def test_trajectory_of_the_shipped_model_and_odd_texts(at):
    page = open_tab(at, "Hidden-state trajectory")
    assert "default" in at.selectbox(key="inspect_model").value
    from charrnn import inspection as ins
    from charrnn.checkpoint import load_checkpoint
    shipped = load_checkpoint(ROOT / "checkpoints" / "default.safetensors")
    tr = ins.hidden_trajectory(shipped.model, shipped.vocab, SEED_TEXT)
    path = figure_of(at)
    torch.testing.assert_close(torch.tensor([path["x"], path["y"]]).T, tr.points)
    assert f"explain {tr.explained[0]:.1%} and {tr.explained[1]:.1%}" in page
    at.text_area(key="inspect_traj_text").set_value("ab")
    rerun(at)
    assert any("at least three characters" in i.value for i in at.info) and not at.get("plotly_chart")
    at.text_area(key="inspect_traj_text").set_value("The Time Machine, 1895")
    rerun(at)
    assert any("<unk>" in w.value and "'1'" in w.value for w in at.warning)
    at.text_area(key="inspect_traj_text").set_value("the time machine " * 40)   # 680 characters
    page = rerun(at)
    assert f"at its limit: the first {ins.MAX_TRAJECTORY_CHARS} characters are drawn" in page
    assert len(figure_of(at)["x"]) == ins.MAX_TRAJECTORY_CHARS


# -----------------------------------------------------------------------------
# the tabs in a real browser: AppTest cannot click a tab

CHROMIUM = "/usr/bin/chromium"
MARKS = {"Worked example": "One-hot encoding of a (batch, steps) batch", "Shape trace": "Every stage of one forward pass",
         "Concatenation": "Largest absolute difference", "Inside a trained model": "Hidden state over the text",
         "Perplexity": "Perplexity, explained by numbers", "Step through": "The scratch RNN, one step at a time",
         "Hidden-state trajectory": "The two components explain",
         "Gradient flow": "Backpropagation through T steps multiplies"}   # a text each section alone shows
CHARTS_DRAWN = """() => {
    const shown = [...document.querySelectorAll('[data-testid=stPlotlyChart]')].filter(e => e.offsetParent !== null);
    return shown.length > 0 && shown.every(e => e.querySelector('.main-svg'));
}"""


def test_tabs_in_a_browser(tmp_path):
    """Each click on a tab draws that section (its charts painted) and drops the one before."""
    playwright = pytest.importorskip("playwright.sync_api")
    from bench.appserver import CHROMIUM_FLAGS, app_server
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium).")
    shutil.copy(ROOT / "checkpoints" / "default.safetensors", tmp_path)
    expect = playwright.expect
    errors = []
    with open(tmp_path / "streamlit.log", "w+") as log, \
            app_server({"CHARRNN_CHECKPOINTS": str(tmp_path), "CHARRNN_OFFLINE": "1"}, log=log) as (_, url), \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}/inspect")
        expect(page.get_by_text(MARKS["Worked example"])).to_be_visible(timeout=60_000)
        page.wait_for_function(CHARTS_DRAWN, timeout=60_000)
        previous = "Worked example"
        for label in TABS[1:] + TABS[:1]:
            page.get_by_role("tab", name=label).click()
            expect(page.get_by_text(MARKS[label])).to_be_visible()
            expect(page.get_by_text(MARKS[previous])).to_have_count(0)   # lazy: the closed tab is not drawn
            expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)
            if SECTIONS[label][1] and (label != "Gradient flow" or _find_book() is not None):
                page.wait_for_function(CHARTS_DRAWN)
            previous = label
        expect(page.get_by_test_id("stException")).to_have_count(0)
        browser.close()
        log.seek(0)
        assert "Traceback" not in log.read()
    assert not errors, errors


def test_perplexity_sets_the_model_beside_ngram_baselines(at, book):
    """The shipped model against n-grams fitted on its own training tokens: on the typed text, and
    the n-grams' perplexities on the run's training and held-out text (the same as Train's)."""
    from charrnn.checkpoint import read_metadata
    from charrnn.data import load_corpus
    from charrnn.jobs import baselines
    from charrnn.ngram import NGramModel
    open_tab(at, "Perplexity")
    (table,) = [d.value for d in at.dataframe if "held-out text" in d.value.columns]
    assert list(table["model"])[:5] == [f"{n}-gram" for n in range(1, 6)] and table["model"][5].startswith("default")
    corpus = load_corpus("timemachine", "seed", 10_000, 2_000)
    on_run = baselines(corpus)
    assert list(table["held-out text"][:5]) == [on_run[n]["val"] for n in range(1, 6)]
    reading_ids = [corpus.vocab[c] for c in ("the time traveller for so it will be convenient to speak of him was "
                                             "expounding a recondite matter to us")]
    here = NGramModel(5, len(corpus.vocab)).fit(corpus.train).perplexities(reading_ids)
    assert list(table["this text"][:5]) == pytest.approx([here[n] for n in range(1, 6)])
    shipped = read_metadata(ROOT / "checkpoints" / "default.safetensors")["metrics"]["perplexity"]
    assert table["training text"][5] == pytest.approx(shipped, abs=1e-3)     # the shipped model's own figure


def test_gradient_flow_pickers_start_on_different_models(at, ckpt_dir):
    """Side by side, the second picker starts on the next model in the list (here: the shipped
    model against an untrained one), not on the same one twice."""
    open_tab(at, "Gradient flow")
    first, second = (at.selectbox(key=f"inspect_flow_model_{i}").value for i in range(2))
    assert first.startswith("default") and first != second
    assert second == at.selectbox(key="inspect_flow_model_1").options[1]


def test_gradient_flow_of_saved_runs_side_by_side(at, ckpt_dir, small_corpus):
    """Two saved runs: their probes per epoch from the checkpoints, as heatmaps on one colour scale,
    and sigma_max(W_hh) per epoch for both."""
    from charrnn.checkpoint import read_metadata
    from charrnn.jobs import JobRegistry
    from charrnn.train import TrainConfig
    registry, saved = JobRegistry(), {}
    for kind in ("rnn", "lstm"):
        job = registry.start(TrainConfig(model=kind, hidden_size=16, epochs=3, probe_every=1), small_corpus)
        job.join(60)
        saved[kind] = read_metadata(job.save(kind))
    open_tab(at, "Gradient flow")
    for i, kind in enumerate(("rnn", "lstm")):
        at.selectbox(key=f"inspect_flow_model_{i}").set_value(f"{kind} — {kind}-16, 3 epochs")
    rerun(at)
    maps = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    heat = [m for m in maps if m["data"][0]["type"] == "heatmap"]
    assert [m["layout"]["title"]["text"].split(": ", 1)[1] for m in heat] == ["rnn — rnn-16, 3 epochs", "lstm — lstm-16, 3 epochs"]
    for m, kind in zip(heat, ("rnn", "lstm")):
        assert "Gradient" in m["layout"]["title"]["text"]
        assert m["data"][0]["y"] == [str(e) for e in saved[kind]["gradflow"]["epoch"]] == ["0", "1", "2", "3"]
        assert m["data"][0]["customdata"] == saved[kind]["gradflow"]["h"]
    assert heat[0]["data"][0]["zmin"] == heat[1]["data"][0]["zmin"]
    (sigma,) = [m for m in maps if m["data"][0]["type"] == "scatter"]
    assert [t["y"] for t in sigma["data"]] == [saved[k]["history"]["sigma_max"] for k in ("rnn", "lstm")]
