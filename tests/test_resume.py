"""Continuing a saved run: 3 epochs, then 2 resumed, end exactly where 5 uninterrupted epochs end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from charrnn.checkpoint import load_checkpoint, make_metadata, read_metadata, save_checkpoint
from charrnn.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "charrnn", "train", *args, "--json", "--quiet"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=os.environ)
    return r, (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_three_then_two_is_five(ckpt_dir, small_text_file, sampling):
    run = ("--corpus", str(small_text_file), "--model", "rnn", "--hidden", "32", "--sampling", sampling)
    _, full = cli(*run, "--epochs", "5", "--save", "full")
    _, part = cli(*run, "--epochs", "3", "--save", "part")
    r, resumed = cli("--resume", "part", "--corpus", str(small_text_file), "--epochs", "2", "--save", "resumed")
    assert r.returncode == 0, r.stderr
    assert part["epochs"] == 3 and resumed["epochs"] == full["epochs"] == 5
    assert resumed["perplexity"] == pytest.approx(full["perplexity"], abs=1e-4)
    a = safetensors.torch.load_file(ckpt_dir / "full.safetensors")
    b = safetensors.torch.load_file(ckpt_dir / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)        # bit for bit
    history = read_metadata(ckpt_dir / "resumed.safetensors")["history"]
    uninterrupted = read_metadata(ckpt_dir / "full.safetensors")["history"]
    assert history["epoch"] == [1, 2, 3, 4, 5]
    # sigma_max is estimated by an iteration warm-started from the epoch before (charrnn/gradflow.py):
    # on the same weights, a resumed run starts it afresh, so it agrees to the estimate's accuracy
    sigma, uninterrupted_sigma = history.pop("sigma_max"), uninterrupted.pop("sigma_max")
    assert history == uninterrupted and sigma == pytest.approx(uninterrupted_sigma, rel=1e-3)


def test_adam_state_carries_over(small_corpus, tmp_path):
    config = TrainConfig(model="scratch", hidden_size=16, optimizer="adam", lr=0.01, sample_every=10**6)
    full = Trainer(config.__class__(**{**config.__dict__, "epochs": 4}), small_corpus)
    list(full.run())
    part = Trainer(config.__class__(**{**config.__dict__, "epochs": 2}), small_corpus)
    list(part.run())
    path = save_checkpoint(tmp_path / "part", part.model, make_metadata(part), optimizer=part.resume_state()[0])
    loaded = load_checkpoint(path)
    assert loaded.optimizer                                   # Adam's moments were saved beside the weights
    more = Trainer(config.__class__(**{**config.__dict__, "epochs": 2}), small_corpus, model=loaded.model)
    more.resume(loaded.meta, loaded.optimizer)
    list(more.run())
    assert more.epoch == 4
    assert all(torch.equal(p, q) for p, q in zip(full.model.parameters(), more.model.parameters()))


def test_only_the_allowed_settings_change(ckpt_dir, small_text_file, tmp_path):
    _, _ = cli("--corpus", str(small_text_file), "--model", "rnn", "--hidden", "16", "--epochs", "1", "--save", "base")
    r, _ = cli("--resume", "base", "--corpus", str(small_text_file), "--hidden", "64", "--epochs", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--hidden cannot be given" in lines[0], r.stderr
    other = tmp_path / "other.txt"
    other.write_text(small_text_file.read_text()[::-1])
    r, _ = cli("--resume", "base", "--corpus", str(other), "--epochs", "1")
    assert r.returncode == 2 and "other.txt is not the text base trained on" in r.stderr
    r, out = cli("--resume", "base", "--corpus", str(small_text_file), "--epochs", "1", "--lr", "0.5")
    assert r.returncode == 0 and out["epochs"] == 2 and out["lr"] == 0.5
    assert "will not match an uninterrupted run" in r.stderr
