"""The app under bad input: damaged checkpoints, names that leave the folder, no corpus offline."""
import os
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A checkpoints folder with the shipped model and four broken files beside it."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(ROOT / "checkpoints" / "default.safetensors", folder)
    good = (folder / "default.safetensors").read_bytes()
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 3])
    (folder / "noise.safetensors").write_bytes(os.urandom(2048))
    (folder / "notes.safetensors").write_text("not a model\n")
    monkeypatch.setenv("CHARRNN_CHECKPOINTS", str(folder))
    from pages.common import registry
    yield folder
    registry().stop_all()


def page(name):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    at.switch_page(f"pages/{name}.py")
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.mark.parametrize("name", ["generate", "inspect"])
def test_broken_checkpoints_are_skipped_with_a_note(folder, name):
    at = page(name)
    if name == "inspect":                     # the picker is in a lazy tab: open it, as a click does
        at.session_state["inspect_tab"] = "Inside a trained model"
        at.run()
    options = at.selectbox(key="gen_model" if name == "generate" else "inspect_model").options
    assert any(o.startswith("default") for o in options)
    assert not any(o.startswith(("empty", "truncated", "noise", "notes")) for o in options)
    notes = " ".join(c.value for c in at.caption)
    assert "Skipped unreadable files" in notes and "truncated.safetensors" in notes


def test_generate_still_works_beside_broken_files(folder):
    at = page("generate")
    at.button(key="generate").click().run()
    assert not at.exception and not at.error
    assert "time traveller" in at.get("html")[0].proto.body


def test_a_save_name_that_leaves_the_folder_is_refused(folder, book):
    from pages.common import registry
    at = page("train")
    at.selectbox(key="train_model").set_value("rnn").run()
    at.number_input(key="train_hidden_rnn").set_value(16)
    at.number_input(key="train_epochs").set_value(1)
    at.run()
    at.button(key="start").click().run()
    job = registry().jobs()[-1]
    job.join(60)
    at.run()
    for bad in ["../x", "a/b", ".hidden"]:
        at.text_input(key=f"save_name_{job.id}").set_value(bad)
        at.button(key="save").click().run()
        assert any("not a usable checkpoint name" in e.value for e in at.error), bad
    assert sorted(p.name for p in folder.parent.rglob("*.safetensors") if p.parent != folder) == []
    at.text_input(key=f"save_name_{job.id}").set_value("fine-name")
    at.button(key="save").click().run()
    assert (folder / "fine-name.safetensors").is_file()


@pytest.mark.parametrize("data", ["unset", "empty folder"])
def test_offline_without_a_copy_offers_the_upload(tmp_path, monkeypatch, data):
    """Offline with no copy of the book: Upload is picked, and with The Time Machine picked, Start
    is off and every text on the page says why and what to do, never 'press Start'."""
    from pages.common import corpus_for, timemachine_problem
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("CHARRNN_DATA", "" if data == "unset" else str(empty))
    monkeypatch.setenv("CHARRNN_OFFLINE", "1")
    monkeypatch.setenv("CHARRNN_CACHE", str(tmp_path / "cache"))
    corpus_for.clear(), timemachine_problem.clear()  # process-wide caches: another test may have found the book
    try:
        at = page("train")
        assert at.radio(key="train_corpus").value == "Upload a .txt"
        assert at.button(key="start").disabled
        texts = lambda: " ".join(e.value for e in (*at.info, *at.warning, *at.caption))
        assert "Upload a .txt file under Settings." in texts() and "Press **Start**" not in texts()
        at.radio(key="train_corpus").set_value("The Time Machine").run()
        assert not at.exception, at.exception
        warning = " ".join(w.value for w in at.warning)
        assert ("Could not download The Time Machine" if data == "unset" else "CHARRNN_DATA points at") in warning
        assert "set CHARRNN_DATA" in warning or "is missing" in warning
        assert at.button(key="start").disabled
        said = texts()      # in the box under Start, or beside it when earlier runs are listed
        assert "Press **Start**" not in said and said.count("**Start** is off") == 1
        assert "upload a .txt file" in said and "`CHARRNN_DATA`" in said and "`timemachine.txt`" in said
    finally:
        corpus_for.clear(), timemachine_problem.clear()
