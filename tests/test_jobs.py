"""Background training jobs: one at a time, prompt stop, errors kept as sentences, compact history,
default names that outlive the process, saves that never replace a checkpoint unless asked."""
import itertools
import re
import threading
import time
import types
from dataclasses import replace

import pytest
import torch

from charrnn import jobs as jobs_module
from charrnn.checkpoint import CheckpointExists, load_checkpoint, read_metadata
from charrnn.jobs import Job, JobBusy, JobRegistry
from charrnn.train import TrainConfig

SMALL = dict(model="rnn", hidden_size=32)


@pytest.fixture
def registry():
    reg = JobRegistry(keep=3)
    yield reg
    reg.stop_all()


def wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_one_job_at_a_time_and_stop_ends_the_worker(registry, small_corpus):
    job = registry.start(TrainConfig(**SMALL, epochs=100_000), small_corpus)
    assert wait_for(lambda: job.snapshot().epoch >= 2)
    with pytest.raises(JobBusy, match="already training"):
        registry.start(TrainConfig(**SMALL, epochs=5), small_corpus)
    threads_during = threading.active_count()
    job.stop(timeout=30)                              # between two minibatches (no clock: machines vary)
    assert not job.alive and threading.active_count() == threads_during - 1   # the worker is gone
    snap = job.snapshot()
    assert snap.status == "stopped" and snap.epoch >= 2 and snap.eta_s is None
    assert len(snap.columns["epoch"]) == snap.epoch + 1                      # epoch 0 included
    assert snap.samples[0][0] == 0                                          # the untrained sample


def test_finished_job_saves_and_reloads(registry, small_corpus, ckpt_dir):
    job = registry.start(TrainConfig(**SMALL, epochs=3), small_corpus)
    job.join(60)
    snap = job.snapshot()
    assert snap.status == "finished" and snap.epoch == 3 and snap.last("train_ppl") < 28
    path = job.save("job-test")
    loaded = load_checkpoint(path)
    assert loaded.meta["metrics"]["epochs"] == 3
    assert loaded.meta["command"].startswith("python -m charrnn train --corpus small.txt")
    assert "--hidden 32" in loaded.meta["command"] and snap.saved == [] and job.snapshot().saved == [path]


def test_saving_a_running_job_is_refused(registry, small_corpus, ckpt_dir):
    job = registry.start(TrainConfig(**SMALL, epochs=100_000), small_corpus)
    with pytest.raises(JobBusy, match="Stop the run"):
        job.save("too-early")


def test_errors_in_the_worker_become_one_sentence(registry, small_corpus, monkeypatch):
    job = registry.start(TrainConfig(**SMALL, lr=1e30, clip=0, epochs=50), small_corpus)
    job.join(60)
    snap = job.snapshot()
    assert snap.status == "failed" and "diverged" in snap.error and "\n" not in snap.error

    job = registry.start(TrainConfig(**SMALL, epochs=50), small_corpus)
    job.join(0.1)
    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(job.trainer, "train_epoch", boom)
    job.join(60)
    snap = job.snapshot()
    assert snap.status == "failed" and "disk on fire" in snap.error


def test_bad_settings_raise_in_the_caller_and_start_nothing(registry, small_corpus):
    with pytest.raises(ValueError, match="fewer than one batch"):
        registry.start(TrainConfig(**SMALL, batch_size=4096, num_steps=35, epochs=1), small_corpus)
    assert registry.jobs() == []


def test_old_ended_runs_are_forgotten(registry, small_corpus):
    for _ in range(5):
        registry.start(TrainConfig(**SMALL, epochs=1), small_corpus).join(60)
    assert len(registry.jobs()) <= 4


def test_history_is_compact(registry, small_corpus):
    job = registry.start(TrainConfig(**SMALL, epochs=3), small_corpus)
    job.join(60)
    assert all(a.typecode == "d" for a in job.columns.values())  # 8 bytes a value, not dicts


def test_default_names_do_not_repeat_after_a_restart(small_corpus, monkeypatch):
    """Job ids start again at run1 with every server; the default name uses the start time instead."""
    clock = itertools.count(1_700_000_000, 3600)        # each job starts an hour after the last
    monkeypatch.setattr(jobs_module, "time", types.SimpleNamespace(
        perf_counter=time.perf_counter, strftime=time.strftime, localtime=lambda: time.localtime(next(clock))))
    names = []
    for _ in range(2):                                  # two "server starts": fresh ids, fresh registry
        monkeypatch.setattr(Job, "_ids", itertools.count(1))
        registry = JobRegistry()
        job = registry.start(TrainConfig(**SMALL, epochs=1), small_corpus)
        job.join(60)
        assert job.id == "run1"
        assert re.fullmatch(r"rnn-32-\d{8}-\d{6}", job.default_name)
        assert job.default_name == "rnn-32-" + time.strftime("%Y%m%d-%H%M%S", job.started_at)
        names.append(job.default_name)
    assert names[0] != names[1]


def test_saving_under_a_taken_name_is_refused_unless_overwrite(registry, small_corpus, ckpt_dir):
    job = registry.start(TrainConfig(**SMALL, epochs=1), small_corpus)
    job.join(60)
    path = job.save(job.default_name)
    assert path == str(ckpt_dir / f"{job.default_name}.safetensors")
    before = (ckpt_dir / f"{job.default_name}.safetensors").read_bytes()
    other = registry.start(TrainConfig(**SMALL, epochs=2), small_corpus)
    other.join(60)
    with pytest.raises(CheckpointExists, match="exists already"):
        other.save(job.default_name)
    assert (ckpt_dir / f"{job.default_name}.safetensors").read_bytes() == before
    assert other.snapshot().saved == []
    assert other.save(job.default_name, overwrite=True) == path
    assert read_metadata(path)["metrics"]["epochs"] == 2 and other.snapshot().saved == [path]


def test_history_downloads_as_csv(registry, small_corpus):
    job = registry.start(TrainConfig(**SMALL, epochs=2), small_corpus)
    job.join(60)
    lines = job.snapshot().history_csv().splitlines()
    assert lines[0] == "epoch,train_ppl,val_ppl,tokens_per_s,grad_norm,grad_norm_max,clipped,sigma_max,elapsed_s"
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2"]
    untrained, last = lines[1].split(","), lines[-1].split(",")
    assert untrained[1] == "" and float(untrained[2]) > 1          # epoch 0: no training loss, a validation one
    assert float(last[1]) == job.snapshot().last("train_ppl")      # full precision, not rounded


def test_an_ended_run_continues_where_it_stopped(registry, small_corpus):
    """Continue: the same job trains more epochs, its history goes on, and it ends where one
    longer run ends."""
    job = registry.start(TrainConfig(**SMALL, epochs=2, sample_every=10**6), small_corpus)
    job.join(60)
    other = registry.start(TrainConfig(**SMALL, epochs=1), small_corpus)
    with pytest.raises(JobBusy):
        registry.resume(job.id, 3)                  # one run at a time
    other.join(60)
    registry.resume(job.id, 3).join(60)
    snap = job.snapshot()
    assert snap.status == "finished" and snap.epoch == snap.epochs == 5
    assert snap.columns["epoch"] == [0, 1, 2, 3, 4, 5]
    longer = registry.start(TrainConfig(**SMALL, epochs=5, sample_every=10**6), small_corpus)
    longer.join(60)
    assert all(torch.equal(p, q) for p, q in zip(job.trainer.model.parameters(), longer.trainer.model.parameters()))


def test_a_saved_checkpoint_continues_as_a_new_run(registry, small_corpus, ckpt_dir):
    """Continue a checkpoint: a new job whose curve starts with the saved history and which ends
    exactly where one uninterrupted run ends."""
    config = TrainConfig(**SMALL, epochs=2, sample_every=10**6)
    saved = registry.start(config, small_corpus)
    saved.join(60)
    path = saved.save("two")
    job, notes = registry.continue_saved(load_checkpoint(path), small_corpus, epochs=3)
    assert notes == [] and job is not saved and job.label == "two (continued)"
    job.join(60)
    snap = job.snapshot()
    assert snap.status == "finished" and snap.epoch == snap.epochs == 5
    assert snap.columns["epoch"] == [0, 1, 2, 3, 4, 5]
    assert snap.columns["train_ppl"][1:3] == saved.snapshot().columns["train_ppl"][1:]   # the saved curve, then more
    longer = registry.start(replace(config, epochs=5), small_corpus)
    longer.join(60)
    assert all(torch.equal(p, q) for p, q in zip(job.trainer.model.parameters(), longer.trainer.model.parameters()))
    assert snap.columns["train_ppl"][1:] == longer.snapshot().columns["train_ppl"][1:]


def test_continuing_a_checkpoint_checks_its_text_and_says_what_changed(registry, small_corpus, ckpt_dir):
    from charrnn.data import load_corpus
    from charrnn.errors import UserError
    saved = registry.start(TrainConfig(**SMALL, epochs=1), small_corpus)
    saved.join(60)
    loaded = load_checkpoint(saved.save("one"))
    other = load_corpus("other.txt", "seed", 0, text="a quite different text " * 50)
    with pytest.raises(UserError, match="not the text one trained on"):
        registry.continue_saved(loaded, other, epochs=1)
    assert len(registry.jobs()) == 1                              # nothing started
    job, notes = registry.continue_saved(loaded, small_corpus, epochs=1, lr=0.5)
    assert notes == ["lr differs from the saved run's"] and job.config.lr == 0.5
    with pytest.raises(JobBusy):
        registry.continue_saved(load_checkpoint(ckpt_dir / "one.safetensors"), small_corpus, epochs=1)
    job.join(60)


def test_a_run_carries_the_ngram_baselines_of_its_text(registry, small_corpus):
    from charrnn.ngram import corpus_ngram_perplexities
    job = registry.start(TrainConfig(**SMALL, epochs=1), small_corpus)
    job.join(60)
    assert job.snapshot().ngram == corpus_ngram_perplexities(small_corpus)
    assert sorted(job.snapshot().ngram) == [1, 2, 3, 4, 5]


def test_no_ngram_baselines_for_a_huge_training_slice(registry, small_corpus, monkeypatch):
    monkeypatch.setattr(jobs_module, "MAX_NGRAM_TOKENS", len(small_corpus.train) - 1)
    job = registry.start(TrainConfig(**SMALL, epochs=1), small_corpus)
    job.join(60)
    assert job.snapshot().status == "finished" and job.snapshot().ngram is None
