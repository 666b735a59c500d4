"""The command line as other tools use it: flags, the --json keys, exit status 2 on bad input,
tracebacks for bugs, and saves that never replace a checkpoint unless asked."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import charrnn.__main__ as cli_main
from charrnn.checkpoint import read_metadata
from charrnn.device import available_devices

ROOT = Path(__file__).resolve().parent.parent
JSON_KEYS = {"model", "hidden", "epochs", "sampling", "device", "perplexity", "val_perplexity",
             "tokens_per_s", "wall_s", "sample", "kernel", "precision"}


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "charrnn", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=(os.environ | (env or {})))


@pytest.fixture
def small(small_text_file):
    """--corpus with a built text: most CLI tests need some text, not the book's."""
    return ("--corpus", str(small_text_file))


def test_train_json_save_and_generate(ckpt_dir, book):
    r = cli("train", "--model", "gru", "--hidden", "32", "--epochs", "2", "--save", "cli-test", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert JSON_KEYS <= set(result)
    assert result["model"] == "gru" and result["hidden"] == 32 and result["epochs"] == 2
    assert result["device"] == available_devices()[0] and result["sample"].startswith("time traveller")
    assert result["precision"] == "fp32"            # auto: the GRU has no bf16 path
    assert 1 < result["perplexity"] < 30 and result["tokens_per_s"] > 0
    assert (ckpt_dir / "cli-test.safetensors").is_file()
    assert "epoch" in r.stderr                      # the progress bar
    g = cli("generate", "--checkpoint", "cli-test", "--prefix", "time traveller", "--length", "20", "--json")
    assert g.returncode == 0, g.stderr
    out = json.loads(g.stdout)
    assert out["text"].startswith("time traveller") and len(out["continuation"]) >= 20
    assert out["path"] in ("python",) or out["path"].endswith("-fp32 loop")   # which loop generated it
    lst = cli("list")
    assert "cli-test" in lst.stdout and "gru" in lst.stdout


@pytest.mark.parametrize("args, message", [
    (("train", "--epochs", "-1"), "Epochs"),
    (("train", "--epochs", "0"), "Epochs"),
    (("train", "--hidden", "0"), "Hidden size"),
    (("train", "--batch-size", "0"), "Batch size"),
    (("train", "--model", "transformer"), "invalid choice"),
    (("train", "--corpus", "/nonexistent/book.txt"), "No text file"),
    (("train", "--device", next(d for d in ("cuda", "mps") if d not in available_devices())), "not available"),
    (("train", "--lr", "abc"), "invalid float"),
    (("train", "--model", "gru", "--precision", "bf16"), "Precision bf16 is not available"),
    (("train", "--precision", "fp16"), "invalid choice"),
    (("train", "--threads", "-1"), "Threads must be between 0"),
    (("generate", "--checkpoint", "/nonexistent/model.safetensors"), "No checkpoint"),
    (("generate", "--checkpoint", "../x"), "No checkpoint"),
    (("generate", "--checkpoint", "bad name"), "not a usable checkpoint name"),
    (("generate", "--length", "-5"), "0 or more"),
    (("generate", "--temperature", "0"), "above 0"),
    (("generate", "--prefix", ""), "prefix is empty"),
])
def test_bad_input_exits_2_with_one_line(args, message, small):
    if args[0] == "train" and "--corpus" not in args:
        args = (*args, *small)
    r = cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_checkpoint_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(100))
    r = cli("generate", "--checkpoint", str(bad))
    assert r.returncode == 2 and "not a readable checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_offline_without_a_copy(tmp_path):
    """No CHARRNN_DATA, an empty cache and no network: one sentence that says what to do."""
    env = {"CHARRNN_DATA": "", "CHARRNN_OFFLINE": "1", "CHARRNN_CACHE": str(tmp_path)}
    r = cli("train", "--epochs", "1", env=env)
    assert r.returncode == 2 and "set CHARRNN_DATA" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_enormous_length_is_capped(tmp_path):
    r = cli("generate", "--length", "1000000", "--json")
    assert r.returncode == 0, r.stderr
    assert "capped at 10000" in r.stderr
    assert len(json.loads(r.stdout)["continuation"]) >= 10000


def test_divergence_exits_1_and_keeps_the_last_good_model(ckpt_dir, small):
    r = cli("train", "--model", "rnn", "--hidden", "16", "--lr", "1e30", "--clip", "0", "--epochs", "20",
            "--save", "diverged", "--json", *small)
    assert r.returncode == 1 and "diverged" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("payload, message", [
    (b"", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00binary", "binary"),
    (b"na\xefve caf\xe9", "not UTF-8"),
    (b"too short for a batch " * 10, "fewer than one batch"),
])
def test_bad_own_corpus(tmp_path, payload, message):
    path = tmp_path / "mine.txt"
    path.write_bytes(payload)
    r = cli("train", "--corpus", str(path), "--epochs", "1")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unwritable_save_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = cli("train", "--epochs", "500", "--save", str(blocker / "model.safetensors"))
    assert r.returncode == 2 and "Cannot write" in r.stderr and "epoch" not in r.stderr


def test_tiny_temperature_and_suffixed_names_work():
    r = cli("generate", "--checkpoint", "default.safetensors", "--temperature", "1e-40", "--seed", "1",
            "--length", "20")
    assert r.returncode == 0 and r.stdout.startswith("time traveller"), r.stderr


@pytest.mark.parametrize("args, message", [
    (("bench", "--rounds", "0"), "at least 1"),
    (("bench", "--models", "transformer"), "comma-separated list"),
    (("bench", "--peer", "/nonexistent/harness.py"), "No benchmark harness"),
])
def test_bench_bad_input(args, message):
    r = cli(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


TINY = ("train", "--model", "rnn", "--hidden", "16", "--epochs", "1", "--quiet", "--json")


def test_a_taken_name_is_refused_before_training_unless_overwrite(ckpt_dir, small):
    first = cli(*TINY, *small, "--save", "mine")
    assert first.returncode == 0, first.stderr
    path = ckpt_dir / "mine.safetensors"
    before = path.read_bytes()
    r = cli("train", "--model", "rnn", "--hidden", "16", "--epochs", "100000", *small, "--save", "mine")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert str(path) in lines[0] and "exists already" in lines[0] and "--overwrite" in lines[0]
    assert "epoch" not in r.stderr and "Traceback" not in r.stderr   # refused before training began
    assert path.read_bytes() == before
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["mine.safetensors"]
    o = cli(*TINY, *small, "--seed", "1", "--save", "mine", "--overwrite")
    assert o.returncode == 0, o.stderr
    assert json.loads(o.stdout.strip().splitlines()[-1])["checkpoint"] == str(path)
    assert path.read_bytes() != before and "--overwrite" in read_metadata(path)["command"]


def test_a_name_taken_while_training_saves_under_a_dated_name(ckpt_dir, monkeypatch, capsys, small):
    """Someone saves `mine` after the early check: the run is kept as mine-YYYYmmdd-HHMMSS."""
    path = ckpt_dir / "mine.safetensors"
    real_check = cli_main.check_writable
    def check_then_taken(target, overwrite=False):
        real_check(target, overwrite)
        path.write_bytes(b"someone else's model")
    monkeypatch.setattr(cli_main, "check_writable", check_then_taken)
    cli_main.main([*TINY, *small, "--save", "mine"])
    out, err = capsys.readouterr()
    saved = Path(json.loads(out.strip().splitlines()[-1])["checkpoint"])
    assert saved.parent == ckpt_dir and re.fullmatch(r"mine-\d{8}-\d{6}\.safetensors", saved.name)
    assert read_metadata(saved)["metrics"]["epochs"] == 1
    assert path.read_bytes() == b"someone else's model"
    assert str(path) in err and f"saved {saved} instead" in err


BROKEN = """
import sys
import charrnn.__main__ as m
from charrnn import bench
from charrnn.checkpoint import CheckpointError
def broken(args):
    if sys.argv[1] == "torch":
        import torch
        torch.nn.functional.dropout(torch.zeros(2), p=2.0)   # a ValueError from inside torch
    if sys.argv[1] == "builtin":
        int("not a number")                                  # a ValueError from a bug in charrnn
    raise {"key": KeyError("lost"), "runtime": RuntimeError("native crash"),
           "user": CheckpointError("No checkpoint at x."), "interrupt": KeyboardInterrupt()}[sys.argv[1]]
def failed_child(*args):
    raise bench.BenchError("The benchmark's run `python -m charrnn train` ended with exit status 1: "
                           "KeyError: 'x'; its full output is in /tmp/charrnn-bench-x.log.")
m.cmd_list = broken
bench.ours = failed_child
m.main(["bench", "--models", "rnn", "--rounds", "1", "--epochs", "1"] if sys.argv[1] == "bench" else ["list"])
"""


@pytest.mark.parametrize("error, status, last_line", [
    ("key", 1, "KeyError: 'lost'"),
    ("runtime", 1, "RuntimeError: native crash"),
    ("torch", 1, "ValueError: dropout probability"),
    ("builtin", 1, "ValueError: invalid literal for int()"),
    ("user", 2, "charrnn: error: No checkpoint at x."),
    ("interrupt", 130, "charrnn: interrupted."),
    ("bench", 1, "charrnn: error: The benchmark's run `python -m charrnn train` ended with exit status 1"),
])
def test_bugs_show_their_traceback_and_mistakes_one_line(error, status, last_line):
    r = subprocess.run([sys.executable, "-c", BROKEN, error], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == status and lines[-1].startswith(last_line), r.stderr
    if error != "bench" and status == 1:
        assert lines[0] == "Traceback (most recent call last):" and "charrnn: error" not in r.stderr
    else:
        assert len(lines) == 1
