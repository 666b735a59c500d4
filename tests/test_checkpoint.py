"""Checkpoints: round trip, damaged and foreign files, names, a save killed half-way, and saves
that never replace a file unless asked."""
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from charrnn.checkpoint import (CheckpointError, CheckpointExists, check_writable, list_checkpoints, load_checkpoint,
                                make_metadata, path_for_name, read_metadata, save_checkpoint)
from charrnn.generate import predict
from charrnn.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def trained(small_corpus):
    trainer = Trainer(TrainConfig(model="lstm", hidden_size=24, epochs=2, device="cpu"), small_corpus)
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
checkpoint.save_checkpoint(sys.argv[1], model, {"format": "charrnn-checkpoint"}, overwrite=True)
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


def test_a_taken_name_is_refused_and_the_file_kept(trained, ckpt_dir):
    path = save_checkpoint(path_for_name("mine"), trained.model, make_metadata(trained, command="first"))
    before = path.read_bytes()
    with pytest.raises(CheckpointExists) as e:
        save_checkpoint(path_for_name("mine"), trained.model, make_metadata(trained, command="second"))
    message = str(e.value)
    assert e.value.path == path and isinstance(e.value, CheckpointError)
    assert str(path) in message and "overwrite" in message and "\n" not in message
    assert path.read_bytes() == before
    with pytest.raises(CheckpointExists):                   # the name without its suffix is the same file
        save_checkpoint(ckpt_dir / "mine", trained.model, make_metadata(trained))
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["mine.safetensors"]   # no temporary files left
    again = save_checkpoint(path, trained.model, make_metadata(trained, command="second"), overwrite=True)
    assert again == path and read_metadata(path)["command"] == "second"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["mine.safetensors"]


def test_a_name_taken_during_the_save_is_refused_atomically(trained, ckpt_dir, monkeypatch):
    """Another save takes the name after the early check, while this one writes its temp file:
    the hard link fails instead of replacing the other file."""
    path = ckpt_dir / "raced.safetensors"
    real_fsync = os.fsync
    def other_save_meanwhile(fd):
        real_fsync(fd)
        if not path.exists():
            path.write_bytes(b"the other save")
    monkeypatch.setattr(os, "fsync", other_save_meanwhile)
    with pytest.raises(CheckpointExists):
        save_checkpoint(path, trained.model, make_metadata(trained))
    assert path.read_bytes() == b"the other save"
    assert [p.name for p in ckpt_dir.iterdir()] == ["raced.safetensors"]


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_without_hard_links_a_taken_name_is_still_refused(trained, ckpt_dir, monkeypatch, code):
    def no_links(src, dst):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "link", no_links)
    path = save_checkpoint(ckpt_dir / "nolinks", trained.model, make_metadata(trained, command="first"))
    assert read_metadata(path)["command"] == "first"
    before = path.read_bytes()
    with pytest.raises(CheckpointExists):
        save_checkpoint(path, trained.model, make_metadata(trained, command="second"))
    assert path.read_bytes() == before
    save_checkpoint(path, trained.model, make_metadata(trained, command="third"), overwrite=True)
    assert read_metadata(path)["command"] == "third"
    assert [p.name for p in ckpt_dir.iterdir()] == ["nolinks.safetensors"]


def test_check_writable_refuses_a_taken_name(trained, ckpt_dir):
    check_writable(ckpt_dir / "free.safetensors")
    path = save_checkpoint(ckpt_dir / "taken", trained.model, make_metadata(trained))
    for target in (path, ckpt_dir / "taken"):
        with pytest.raises(CheckpointExists, match="exists already"):
            check_writable(target)
        check_writable(target, overwrite=True)
    assert [p.name for p in ckpt_dir.iterdir()] == ["taken.safetensors"]


UMASK = """
import os, sys
from pathlib import Path
calls = []
real_umask = os.umask
os.umask = lambda mask: calls.append(mask) or real_umask(mask)
real_umask(0o027)
import charrnn, charrnn.checkpoint, charrnn.__main__, charrnn.jobs
from charrnn.models import ModelConfig, build_model
assert calls == [], f"importing charrnn called os.umask{tuple(calls)}"
folder = Path(sys.argv[1])
path = charrnn.checkpoint.save_checkpoint(folder / "model", build_model(ModelConfig("rnn", 28, 8)),
                                          {"format": "charrnn-checkpoint"})
assert calls == [], f"saving called os.umask{tuple(calls)}"
with open(folder / "plain", "w"):
    pass
print(oct(path.stat().st_mode & 0o777), oct((folder / "plain").stat().st_mode & 0o777), oct(real_umask(0o022)))
"""


def test_the_umask_is_left_alone_and_applied_to_saves(tmp_path):
    """No os.umask at import or save (it is process-wide: a server thread could create files
    meanwhile); the kernel applies it to the checkpoint as to any plain open()."""
    r = subprocess.run([sys.executable, "-c", UMASK, str(tmp_path)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0o640", "0o640", "0o27"]


def test_an_uploaded_checkpoint_is_checked_then_saved(trained, ckpt_dir, tmp_path, monkeypatch):
    """The app's upload: a good file lands in checkpoints/; random bytes, a truncated file, a pickle
    renamed .safetensors and an oversized file are one sentence each and write nothing."""
    import pickle
    from charrnn import checkpoint
    good = save_checkpoint(tmp_path / "good", trained.model, make_metadata(trained)).read_bytes()
    path = checkpoint.import_checkpoint(good, "mine.safetensors")
    assert path == ckpt_dir / "mine.safetensors" and load_checkpoint(path).meta["model"]["kind"] == "lstm"
    with pytest.raises(checkpoint.CheckpointExists):
        checkpoint.import_checkpoint(good, "mine")
    bad = {"noise.safetensors": os.urandom(4096), "truncated.safetensors": good[: len(good) // 2],
           "pickled.safetensors": pickle.dumps({"weights": [1.0, 2.0]})}
    for name, data in bad.items():
        with pytest.raises(CheckpointError, match="not a readable checkpoint") as e:
            checkpoint.import_checkpoint(data, name)
        assert name in str(e.value) and "charrnn-import-" not in str(e.value)   # names the upload
    monkeypatch.setattr(checkpoint, "MAX_IMPORT_BYTES", len(good) - 1)
    with pytest.raises(CheckpointError, match="at most"):
        checkpoint.import_checkpoint(good, "big")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["mine.safetensors"]
