"""The app's pages through streamlit.testing.v1.AppTest: Home, Train (a live job), Generate.

AppTest never fires `run_every`, so the tests poll with at.run() until a deadline. Every job a
test starts is stopped by the `jobs` fixture (tests/conftest.py).
"""
import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent


def app(page=None):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py")
        at.run()
    assert not at.exception, at.exception
    return at


def strict_json(text: str):
    """json.loads as a browser's JSON.parse reads it: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"{name} in chart data: the browser cannot parse it")
    return json.loads(text, parse_constant=refuse)


def live_charts(at) -> list[dict]:
    """The Train page's live charts (pages/live_plot.py), as the figures the browser receives."""
    return [strict_json(c.proto.json) for c in at.get("bidi_component")
            if c.proto.component_name.endswith("live_plot") and c.proto.json not in ("", "null")]  # not the preload


def chart_points(at, index=0) -> int:
    """Points of the first curve of the page's index-th Plotly chart: st.plotly_chart's, or the
    Train page's live charts."""
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")] + live_charts(at)
    if len(specs) <= index:
        return 0
    return len(specs[index]["data"][0].get("x", []))


def poll(at, until, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, at.exception
        if until(at):
            return True
        time.sleep(0.3)
    return False


def test_home_explains_and_links():
    at = app()
    text = " ".join(m.value for m in at.markdown)
    assert "Hidden state" in text and "Perplexity" in text and "Next-character" in text


def test_home_draws_the_shipped_models_learning_curve(ckpt_dir):
    """Home draws the shipped checkpoint's perplexity by epoch from its metadata; without a shipped
    checkpoint it draws nothing and still works."""
    from charrnn.checkpoint import load_checkpoint, read_metadata, save_checkpoint
    shutil.copy(ROOT / "checkpoints" / "default.safetensors", ckpt_dir)
    history = read_metadata(ckpt_dir / "default.safetensors")["history"]
    at = app()
    (spec,) = [strict_json(c.proto.spec) for c in at.get("plotly_chart")]
    assert [t["name"] for t in spec["data"]] == ["training text", "held-out text"]
    assert spec["data"][0]["y"] == pytest.approx(history["train_ppl"])
    assert spec["layout"]["shapes"][0]["y0"] == 28                     # a uniform guess over the vocabulary
    shipped = load_checkpoint(ckpt_dir / "default.safetensors")
    for history in ([], {"epoch": [1, 2]}, None):          # odd metadata: no chart, the page still works
        save_checkpoint(ckpt_dir / "default", shipped.model, shipped.meta | {"history": history}, overwrite=True)
        at = app()
        assert not at.exception and not at.get("plotly_chart")
    (ckpt_dir / "default.safetensors").unlink()
    at = app()
    assert not at.exception and not at.get("plotly_chart")
    assert "Perplexity" in " ".join(m.value for m in at.markdown)


def test_train_page_loads_the_optimizers_code_before_start(ckpt_dir):
    """A fresh process that shows the Train page has imported what torch's first optimizer needs
    (torch._dynamo, a second or two), so the first Start does not wait for it. In a subprocess:
    this process has made optimizers already."""
    code = ("import sys; from streamlit.testing.v1 import AppTest; "
            "at = AppTest.from_file('app.py', default_timeout=120); at.switch_page('pages/train.py'); at.run(); "
            "assert not at.exception, at.exception; "
            "print('before' if 'torch._dynamo' in sys.modules else 'not before'); "
            "import charrnn.train as t; t.preload_optimizers.cache_clear(); t.preload_optimizers(); "
            "print('after' if 'torch._dynamo' in sys.modules else 'not after')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["before", "after"], out.stdout + out.stderr[-2000:]


def test_train_live_chart_stop_and_save(jobs, book):
    at = app("train")
    assert at.number_input(key="train_epochs").value == 500          # the seed's defaults
    assert at.number_input(key="train_hidden_scratch").value == 512
    assert at.number_input(key="train_lr").value == 1.0
    at.selectbox(key="train_model").set_value("rnn").run()
    at.number_input(key="train_hidden_rnn").set_value(64)
    at.number_input(key="train_epochs").set_value(2000)
    at.run()
    started = datetime.now()
    at.button(key="start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    job = jobs.running()
    assert job is not None
    from charrnn.device import default_threads, threads_settable
    if threads_settable():        # the run leaves a core to the server and the browser
        from charrnn.kernels import app_threads
        assert job.config.threads == at.number_input(key="train_threads").value == app_threads(default_threads())
    assert poll(at, lambda a: chart_points(a) >= 2), "the perplexity chart never grew"
    # perplexity, gradient norm, gradient flow, sigma_max: drawn in place, not by st.plotly_chart
    assert len(live_charts(at)) == 4 and not at.get("plotly_chart")
    assert any(m.label == "Tokens / s" for m in at.metric)
    # a second Start while one runs is refused (the button is disabled; a race gets JobBusy)
    assert at.button(key="start").disabled
    from charrnn.jobs import JobBusy
    with pytest.raises(JobBusy, match="already training"):
        jobs.start(job.config, job.corpus)
    # a second tab re-attaches to the same run
    other = app("train")
    assert other.button(key="stop").disabled is False and jobs.running() is job
    at.button(key="stop").click().run()
    job.join(30)                             # the worker ends after its minibatch (no clock: machines vary)
    assert not job.alive
    assert job.snapshot().status == "stopped" and job.trainer.epoch >= 1
    default = at.text_input(key=f"save_name_{job.id}").value       # the run's start time, not its id
    assert default == job.default_name and re.fullmatch(r"rnn-64-\d{8}-\d{6}", default), default
    assert abs(datetime.strptime(default[-15:], "%Y%m%d-%H%M%S") - started) < timedelta(minutes=5)
    at.text_input(key=f"save_name_{job.id}").set_value("from-the-app")
    at.button(key="save").click().run()
    assert any("Saved" in s.value for s in at.success), [e.value for e in at.error]
    downloads = [d.proto.label for d in at.get("download_button")]
    assert downloads == ["Download its history (CSV)", "Download the checkpoint"], downloads
    assert (Path(str(jobs.get(job.id).saved[0]))).is_file()


def test_a_run_without_validation_or_with_odd_labels_draws(jobs):
    """A run with no validation tokens (a short upload) has a validation curve of gaps (None), never
    NaN, which the browser's JSON parser would refuse; a file name with tags is shown as text."""
    from charrnn.data import load_corpus
    from charrnn.train import TrainConfig
    corpus = load_corpus("<b>x</b>.txt", "seed", 0, val_tokens=0, text="the time machine by h g wells " * 3)
    assert corpus.val is None
    job = jobs.start(TrainConfig(model="rnn", hidden_size=8, batch_size=2, num_steps=3, epochs=3), corpus)
    job.join(60)
    at = app("train")
    figure = live_charts(at)[0]
    assert figure["data"][1]["y"] and set(figure["data"][1]["y"]) == {None}
    assert "<b>" not in figure["data"][0]["name"] and "&lt;b&gt;" in figure["data"][0]["name"]


def ended_job(jobs, seed):
    """A finished two-epoch run on a short text with the seed's 28 tokens."""
    from charrnn.data import load_corpus
    from charrnn.train import TrainConfig
    corpus = load_corpus("short.txt", "seed", 0, text="the time traveller saw the quick brown fox jumps over a lazy dog " * 20)
    job = jobs.start(TrainConfig(model="rnn", hidden_size=8, batch_size=2, num_steps=3, epochs=2, seed=seed), corpus)
    job.join(60)
    assert not job.running and job.trainer.epoch == 2
    return job


def test_a_taken_name_is_replaced_only_when_confirmed(jobs, ckpt_dir):
    """Saving under a name already taken (say, a default name from before a server restart)
    leaves the file as it was and asks; only Overwrite replaces it."""
    from charrnn.checkpoint import read_metadata
    first, second = ended_job(jobs, seed=1), ended_job(jobs, seed=2)
    at = app("train")
    run = lambda: next(s for s in at.selectbox if s.label == "Run")
    assert run().value == second.label                                 # the newest run first
    assert at.text_input(key=f"save_name_{second.id}").value == second.default_name
    run().set_value(first.label).run()
    at.text_input(key=f"save_name_{first.id}").set_value("taken")
    at.button(key="save").click().run()
    assert any("Saved" in s.value for s in at.success), [e.value for e in at.error]
    path = ckpt_dir / "taken.safetensors"
    before = path.read_bytes()

    run().set_value(second.label).run()
    at.text_input(key=f"save_name_{second.id}").set_value("taken")
    at.button(key="save").click().run()
    assert not at.exception and not at.error and not at.success
    warning = " ".join(w.value for w in at.warning)
    assert "`taken` exists already" in warning and "nothing was saved" in warning and "**Overwrite**" in warning
    assert path.read_bytes() == before
    at.run()                                                           # a rerun asks again, replaces nothing
    assert at.button(key="save_overwrite") and path.read_bytes() == before
    at.button(key="save_cancel").click().run()                         # Cancel: the question goes, the file stays
    assert not at.warning and path.read_bytes() == before
    with pytest.raises(KeyError):
        at.button(key="save_overwrite")

    at.button(key="save").click().run()                                # asked again
    at.text_input(key=f"save_name_{second.id}").set_value("another").run()   # another name: the question goes
    assert not at.warning and path.read_bytes() == before
    at.text_input(key=f"save_name_{second.id}").set_value("taken")
    at.button(key="save").click().run()
    assert at.warning and path.read_bytes() == before
    at.button(key="save_overwrite").click().run()
    assert not at.exception and not at.error and not at.warning
    assert any("Replaced" in s.value and "taken.safetensors" in s.value for s in at.success)
    assert path.read_bytes() != before and read_metadata(path)["train"]["seed"] == 2
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["default.safetensors", "taken.safetensors"]


def test_log_axes_label_their_ticks_in_full(jobs):
    """Plotly's log axis labels 20 as "2"; the charts give their ticks and write each in full,
    the vocabulary size (the uniform guess) and θ among them, all inside the plotted range."""
    job = ended_job(jobs, seed=1)
    vocab, clip = job.snapshot().vocab_size, job.config.clip
    ppl, grad = live_charts(app("train"))[:2]                  # then the gradient flow and sigma_max
    for figure, mark in [(ppl, vocab), (grad, clip)]:
        axis = figure["layout"]["yaxis"]
        assert axis["type"] == "log" and axis["tickmode"] == "array" and "dtick" not in axis
        values, texts = axis["tickvals"], axis["ticktext"]
        assert values == sorted(values) and len(values) == len(texts) >= 3
        assert [float(t.replace(",", "")) for t in texts] == pytest.approx(values)   # "20", never "2"
        lo, hi = axis["range"]
        assert all(10 ** lo <= v <= 10 ** hi for v in values)
        assert mark in values and f"{mark:g}" in texts
    assert 1 in ppl["layout"]["yaxis"]["tickvals"] and "28" in ppl["layout"]["yaxis"]["ticktext"]


def test_train_divergence_is_one_readable_sentence(jobs, book):
    at = app("train")
    at.selectbox(key="train_model").set_value("rnn").run()
    at.number_input(key="train_hidden_rnn").set_value(16)
    at.number_input(key="train_lr").set_value(10000.0)
    at.number_input(key="train_clip").set_value(0.0)
    at.number_input(key="train_epochs").set_value(50)
    at.run()
    at.button(key="start").click().run()
    assert poll(at, lambda a: any("diverged" in e.value for e in a.error)), [e.value for e in at.error]


def test_generate_from_the_shipped_model(jobs):
    at = app("generate")
    assert at.selectbox(key="gen_model").value.startswith("default")
    at.text_input(key="gen_prefix").set_value("time traveller")
    at.number_input(key="gen_length").set_value(40)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error
    html = at.get("html")[0].proto.body
    assert "time traveller" in html
    assert chart_points(at) == 10                            # top-10 next-character bars
    from charrnn.kernels import fp32
    path = "C generation loop" if fp32.variants() and fp32.load()[0] else "the model, a character at a time"
    assert any(path in c.value for c in at.caption)          # which loop made the text


def test_generate_flags_unknown_characters_and_refuses_empty_prefix(jobs):
    at = app("generate")
    at.text_input(key="gen_prefix").set_value("Time Traveller #42")
    at.button(key="generate").click().run()
    assert any("<unk>" in w.value for w in at.warning)
    at.text_input(key="gen_prefix").set_value("")
    at.button(key="generate").click().run()
    assert any("prefix is empty" in e.value for e in at.error)


def test_generate_untrained_model_and_sampling(jobs):
    at = app("generate")
    untrained = next(o for o in at.selectbox(key="gen_model").options if o.startswith("Untrained"))
    at.selectbox(key="gen_model").set_value(untrained).run()
    at.radio(key="gen_mode").set_value("sample").run()
    at.number_input(key="gen_seed").set_value(3)
    at.button(key="generate").click().run()
    first = at.get("html")[0].proto.body
    at.button(key="generate").click().run()
    assert at.get("html")[0].proto.body == first             # same seed, same text
    assert not at.exception


def test_train_precision_setting(jobs, book):
    """The default trains in the fast precision and says which; bf16 where it cannot run is one
    sentence and starts nothing."""
    from charrnn import kernels
    at = app("train")
    assert at.selectbox(key="train_precision").value == "auto"
    at.selectbox(key="train_model").set_value("gru").run()
    at.number_input(key="train_hidden_gru").set_value(16)
    at.selectbox(key="train_precision").set_value("bf16").run()
    at.button(key="start").click().run()
    assert any("Precision bf16 is not available" in e.value for e in at.error), [e.value for e in at.error]
    assert jobs.running() is None
    at.selectbox(key="train_model").set_value("rnn").run()
    at.number_input(key="train_hidden_rnn").set_value(16)
    at.selectbox(key="train_precision").set_value("auto").run()
    at.number_input(key="train_epochs").set_value(100_000)
    at.run()
    at.button(key="start").click().run()
    job = jobs.running()
    assert job is not None
    expected = kernels.select(job.trainer.model.config, job.trainer.device)   # the fastest here
    assert (job.snapshot().kernel, job.snapshot().precision) == (expected.name, expected.precision)
    assert poll(at, lambda a: any(f"· {expected.name} ·" in p.proto.text for p in a.get("progress")))
    job.stop()


def test_the_train_settings_travel_in_the_link(jobs):
    """Opening a link fills the settings in; a bad value is one warning and keeps its default;
    the link follows every change; the page shows the same settings as a command line."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("pages/train.py")
    for key, value in {"model": "rnn", "hidden": "64", "lr": "abc", "epochs": "7", "sampling": "random",
                       "bidirectional": "maybe", "clip": "0.5"}.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception
    assert at.selectbox(key="train_model").value == "rnn" and at.number_input(key="train_hidden_rnn").value == 64
    assert at.number_input(key="train_epochs").value == 7 and at.radio(key="train_sampling").value == "random"
    assert at.number_input(key="train_clip").value == 0.5
    assert at.number_input(key="train_lr").value == 1.0 and at.checkbox(key="train_bidirectional").value is False
    (warning,) = [w.value for w in at.warning if "link" in w.value]
    assert "lr=abc" in warning and "bidirectional=maybe" in warning
    assert at.query_params["lr"] == "1" and at.query_params["hidden"] == "64"         # the link, mended
    at.number_input(key="train_epochs").set_value(9).run()
    assert at.query_params["epochs"] == "9"                                            # follows the change
    command = next(c.value for c in at.code if c.value.startswith("python -m charrnn train"))
    assert "--model rnn --hidden 64" in command and "--epochs 9" in command and "--sampling random" in command


def test_gradient_probes_are_a_setting(jobs, book):
    """How often a run probes the gradient flow: from the link (a value not offered is one
    warning), into the run's config, the command line and the link."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("pages/train.py")
    at.query_params["probe_every"] = "7"
    at.run()
    assert at.selectbox(key="train_probe_every").value == "auto"                       # the default
    (warning,) = [w.value for w in at.warning if "link" in w.value]
    assert "probe_every=7" in warning
    at.selectbox(key="train_model").set_value("rnn").run()
    at.number_input(key="train_hidden_rnn").set_value(16)
    at.number_input(key="train_epochs").set_value(4)
    at.selectbox(key="train_probe_every").set_value(2).run()
    assert at.query_params["probe_every"] == "2"
    command = next(c.value for c in at.code if c.value.startswith("python -m charrnn train"))
    assert "--probe-every 2" in command
    at.button(key="start").click().run()
    job = jobs.jobs()[-1]
    job.join(60)
    assert job.trainer.config.probe_every == 2
    assert [epoch for epoch, _ in job.trainer.flows] == [0, 1, 2, 4]    # every 2, and the first and last
    at.selectbox(key="train_probe_every").set_value(0).run()
    assert at.query_params["probe_every"] == "0"


def test_continue_goes_on_with_the_same_run(jobs):
    job = ended_job(jobs, seed=1)
    before = job.trainer.epoch
    at = app("train")
    at.number_input(key="continue_epochs").set_value(2)
    at.button(key="continue").click().run()
    assert not at.exception and not at.error
    job.join(60)
    assert poll(at, lambda a: not jobs.running())
    assert job.trainer.epoch == before + 2 and len(job.snapshot().columns["epoch"]) == before + 3   # one curve
    assert len(jobs.jobs()) == 1                                  # the same run, not a new one


def test_the_generate_settings_travel_in_the_link(jobs):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("pages/generate.py")
    for key, value in {"checkpoint": "default", "prefix": "the machine", "length": "30", "temperature": "0.5",
                       "top_k": "x", "seed": "7"}.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception
    assert at.selectbox(key="gen_model").value.startswith("default")
    assert at.text_input(key="gen_prefix").value == "the machine" and at.number_input(key="gen_length").value == 30
    assert at.radio(key="gen_mode").value == "sample" and at.slider(key="gen_temperature").value == 0.5
    assert at.number_input(key="gen_seed").value == 7 and at.number_input(key="gen_top_k").value == 0
    assert any("top_k=x" in w.value for w in at.warning)
    assert at.query_params["checkpoint"] == "default" and at.query_params["top_k"] == "0"
    at.text_input(key="gen_prefix").set_value("time").run()
    assert at.query_params["prefix"] == "time"
    at.query_params["checkpoint"] = "nowhere"                    # read once a session: ignored now
    at.run()
    assert not any("nowhere" in w.value for w in at.warning)


def save_without_optimizer(folder: Path, name: str) -> None:
    """The shipped model saved again as `name` without its optimizer state, as checkpoints were
    saved before they carried it."""
    from charrnn.checkpoint import load_checkpoint, save_checkpoint
    shipped = load_checkpoint(folder / "default.safetensors")
    save_checkpoint(folder / name, shipped.model, {k: v for k, v in shipped.meta.items() if k != "resume"})


def test_a_saved_checkpoint_continues_from_the_list(jobs, ckpt_dir, book):
    """Continue a saved checkpoint: picked from a list, it trains on as a new run whose curve
    starts with the saved history; a checkpoint without optimizer state is not offered."""
    from charrnn.data import load_corpus
    from charrnn.train import TrainConfig
    corpus = load_corpus("timemachine", "seed", 2_000)
    job = jobs.start(TrainConfig(model="rnn", hidden_size=8, epochs=2, max_tokens=2_000), corpus)
    job.join(60)
    job.save("tiny")
    save_without_optimizer(ckpt_dir, "older")
    at = app("train")
    options = at.selectbox(key="continue_saved_name").options
    assert options[0] == f"tiny — rnn-8, 2 epochs, perplexity {job.trainer.last.train_ppl:.2f}"  # newest first
    assert options[1].startswith("default — scratch-512") and len(options) == 2        # not older
    assert at.selectbox(key="continue_saved_name").value == "tiny"
    at.number_input(key="continue_saved_epochs").set_value(3)
    at.button(key="continue_saved").click().run()
    assert not at.exception and not at.error
    (said,) = [s.value for s in at.success if "continues" in s.value]
    assert said == "tiny continues as tiny (continued)."
    (continued,) = [j for j in jobs.jobs() if j is not job]
    continued.join(60)
    assert poll(at, lambda a: not jobs.running())
    # the page drawn after the run's end (its end redraws it) still says it, then no more
    assert [s.value for s in at.success if "continues" in s.value] == [said]
    at.run()
    assert not [s.value for s in at.success if "continues" in s.value]
    assert continued.snapshot().columns["epoch"] == [0, 1, 2, 3, 4, 5]
    assert continued.snapshot().columns["train_ppl"][1:3] == job.snapshot().columns["train_ppl"][1:]


def test_a_checkpoint_without_optimizer_state_is_named_not_offered(jobs, ckpt_dir):
    """With only checkpoints saved without optimizer state, Continue offers none and says why."""
    save_without_optimizer(ckpt_dir, "older")
    (ckpt_dir / "default.safetensors").unlink()
    at = app("train")
    assert not at.exception
    assert not [s for s in at.selectbox if s.key == "continue_saved_name"]
    assert any("(older was saved without optimizer state" in c.value for c in at.caption)


def test_a_checkpoint_of_an_uploaded_text_asks_for_the_text(jobs):
    ended_job(jobs, seed=1).save("short")
    at = app("train")
    at.button(key="continue_saved").click().run()
    assert not at.exception
    (error,) = [e.value for e in at.error]
    assert "short trained on short.txt" in error and "upload that file" in error
    assert len(jobs.jobs()) == 1                                   # nothing started


def test_the_runs_table_compares_runs_and_picks_the_chart(jobs):
    first, second = ended_job(jobs, seed=1), ended_job(jobs, seed=2)
    at = app("train")
    (table,) = at.dataframe
    rows = table.value
    assert list(rows["run"]) == [first.label, second.label] and list(rows["seed"]) == [1, 2]
    assert list(rows["epochs"]) == [2, 2] and rows["train ppl"].notna().all() and rows["tokens/s"].gt(0).all()
    assert set(rows.columns) >= {"model", "hidden", "sampling", "lr", "clip θ", "val ppl", "kernel", "wall time (s)"}
    names = lambda: {t["name"].split(" · ")[0] for t in live_charts(at)[0]["data"] if "-gram" not in t["name"]}
    assert names() == {first.id, second.id}                   # none selected: all
    at.session_state["train_runs"] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.run()
    assert not at.exception and names() == {second.id}          # only the row selected
    third = ended_job(jobs, seed=3)                               # watched now, so always drawn
    at.run()
    assert names() == {second.id, third.id} and len(at.dataframe[0].value) == 3


def test_the_chart_draws_the_ngram_baselines(jobs):
    job = ended_job(jobs, seed=1)
    at = app("train")
    traces = [t for t in live_charts(at)[0]["data"] if "-gram" in t["name"]]
    assert [t["name"] for t in traces if t["showlegend"]] == ["1–5-gram (val)", "1–5-gram (train)"]  # toggles
    lines = {t["name"]: t for t in traces if not t["showlegend"]}
    assert sorted(lines) == sorted(f"{n}-gram ({s})" for n in range(1, 6) for s in ("train", "val"))
    for n, values in job.snapshot().ngram.items():
        assert lines[f"{n}-gram (val)"]["y"] == [values["val"]] * 2 and lines[f"{n}-gram (val)"]["visible"] is True
        assert lines[f"{n}-gram (train)"]["y"] == [values["train"]] * 2
        assert lines[f"{n}-gram (train)"]["visible"] == "legendonly"


def test_the_gradient_flow_through_time_is_drawn_for_two_runs(jobs):
    first, second = ended_job(jobs, seed=1), ended_job(jobs, seed=2)
    at = app("train")
    maps = [f for f in live_charts(at) if f["data"] and f["data"][0]["type"] == "heatmap"]
    assert [m["layout"]["title"]["text"] for m in maps] == [
        f"Gradient ‖∂ℓ_T/∂h_t‖: {first.label}", f"Gradient ‖∂ℓ_T/∂h_t‖: {second.label}"]
    for m, job in zip(maps, (first, second)):
        flows = job.snapshot().flows
        assert m["data"][0]["y"] == [str(e) for e, _ in flows] and m["data"][0]["customdata"] == [f.h_norms for _, f in flows]
        assert len(m["data"][0]["x"]) == job.config.num_steps
    assert maps[0]["data"][0]["zmin"] == maps[1]["data"][0]["zmin"]                   # one colour scale
    at.radio(key="train_flow_of").set_value("x").run()
    maps = [f for f in live_charts(at) if f["data"] and f["data"][0]["type"] == "heatmap"]
    assert "‖∂ℓ_T/∂x_t‖" in maps[0]["layout"]["title"]["text"]
    assert maps[0]["data"][0]["customdata"] == [f.x_norms for _, f in first.snapshot().flows]
    (sigma,) = [f for f in live_charts(at) if f["layout"]["yaxis"]["title"]["text"] == "σ_max(W_hh)"]
    assert [t["y"] for t in sigma["data"]] == [j.snapshot().columns["sigma_max"] for j in (first, second)]
