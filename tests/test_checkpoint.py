"""Checkpoints: round trip, damaged and foreign files, names, and a save killed half-way."""
import os
import signal
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from charrnn.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, make_metadata,
                                path_for_name, read_metadata, save_checkpoint)
from charrnn.generate import predict
from charrnn.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained(corpus):
    trainer = Trainer(TrainConfig(model="lstm", hidden_size=24, epochs=2, device="cpu"), corpus)
    list(trainer.run())
    return trainer


def test_round_trip(trained, ckpt_dir):
    path = save_checkpoint(path_for_name("tiny"), trained.model, make_metadata(trained, command="test"))
    assert path == ckpt_dir / "tiny.safetensors"
    loaded = load_checkpoint(path)
    X = trained.corpus.train[:70].reshape(2, 35)
    with torch.no_grad():
        trained.model.eval()
        Y0, _ = trained.model(X, trained.model.begin_state(2))
        Y1, _ = loaded.model(X, loaded.model.begin_state(2))
    torch.testing.assert_close(Y1, Y0)
    assert loaded.vocab.idx_to_token == trained.corpus.vocab.idx_to_token
    meta = loaded.meta
    assert meta["model"]["kind"] == "lstm" and meta["corpus"]["sha1"] == trained.corpus.sha1
    assert meta["metrics"]["epochs"] == 2 and len(meta["history"]["train_ppl"]) == 2
    assert meta["command"] == "test" and meta["train"]["hidden_size"] == 24
    assert predict("time", 10, loaded.model, loaded.vocab) == predict("time", 10, trained.model, trained.corpus.vocab)
    assert [e["name"] for e in list_checkpoints()] == ["tiny"]


def test_damaged_and_foreign_files(trained, tmp_path):
    good = save_checkpoint(tmp_path / "good", trained.model, make_metadata(trained))
    data = good.read_bytes()
    cases = {
        "missing": None,
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "random": os.urandom(4096),
        "text": b"hello, I am a text file\n",
    }
    for name, payload in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if payload is not None:
            path.write_bytes(payload)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    foreign = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a charrnn checkpoint"):
        load_checkpoint(foreign)
    meta = make_metadata(trained) | {"format_version": 99}
    future = save_checkpoint(tmp_path / "future", trained.model, meta)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(future)
    wrong = make_metadata(trained)
    wrong["model"]["hidden_size"] = 25
    mismatch = save_checkpoint(tmp_path / "mismatch", trained.model, wrong)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(mismatch)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 65, "a b"])
def test_names_cannot_leave_the_folder(name, ckpt_dir):
    with pytest.raises(CheckpointError, match="not a usable checkpoint name"):
        path_for_name(name)


def test_unwritable_folder(trained, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):   # root ignores permissions: use a path under a file instead
            target = tmp_path / "a_file"
            target.write_text("x")
            target = target / "model"
        else:
            target = locked / "model"
        with pytest.raises(CheckpointError, match="Cannot write"):
            save_checkpoint(target, trained.model, make_metadata(trained))
    finally:
        locked.chmod(0o700)


KILLED_SAVE = """
import os, sys, time, torch
from charrnn import checkpoint
from charrnn.models import ModelConfig, build_model
model = build_model(ModelConfig("rnn", 28, 256))
real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)
    time.sleep(60)
os.fsync = slow_fsync
checkpoint.save_checkpoint(sys.argv[1], model, {"format": "charrnn-checkpoint"})
"""


def test_a_killed_save_leaves_the_previous_file_whole(trained, tmp_path):
    path = save_checkpoint(tmp_path / "model", trained.model, make_metadata(trained))
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stdout.readline().strip() == "writing"   # mid-save: the new bytes are in a temp file
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert path.read_bytes() == before
    assert read_metadata(path)["model"]["kind"] == "lstm"
    load_checkpoint(path)


def test_incomplete_metadata_is_reported_not_raised(trained, ckpt_dir):
    meta = make_metadata(trained)
    del meta["model"], meta["corpus"]
    save_checkpoint(ckpt_dir / "partial", trained.model, meta)
    with pytest.raises(CheckpointError, match="lacks model, corpus"):
        read_metadata(ckpt_dir / "partial.safetensors")
    (entry,) = list_checkpoints()
    assert "lacks model" in entry["error"]
