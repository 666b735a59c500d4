"""Shared fixtures. Tests read The Time Machine from ../shared/data (or CHARRNN_DATA) and never
touch the network; checkpoints they write go to a temporary folder."""
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
if "CHARRNN_DATA" not in os.environ and (SHARED_DATA / "timemachine.txt").is_file():
    os.environ["CHARRNN_DATA"] = str(SHARED_DATA)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def corpus():
    from charrnn.data import load_corpus
    return load_corpus("timemachine", "seed", max_tokens=10_000, val_tokens=2_000)


@pytest.fixture
def ckpt_dir(tmp_path, monkeypatch):
    """A fresh checkpoints folder for the test."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    monkeypatch.setenv("CHARRNN_CHECKPOINTS", str(folder))
    return folder


@pytest.fixture
def jobs(ckpt_dir):
    """The app's process-wide job registry, emptied before and stopped after the test; a
    checkpoints folder holding only the shipped model."""
    shutil.copy(ROOT / "checkpoints" / "default.safetensors", ckpt_dir)
    from pages.common import registry
    reg = registry()
    reg.stop_all()
    for job in reg.jobs():
        reg.remove(job.id)
    yield reg
    reg.stop_all()
    assert reg.running() is None
