"""Training: the seed's clipping, state rules, convergence on the real text, stop and divergence."""
import math
import threading

import pytest
import torch
from torch import nn

from charrnn.train import EpochStats, TrainConfig, Trainer, TrainingDiverged, clip_gradients, perplexity


def test_clipping_math():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])   # global norm 5
    norm = clip_gradients([a, b], theta=1.0)
    assert norm.item() == pytest.approx(5.0)                          # the norm before clipping
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0])) and torch.allclose(b.grad, torch.tensor([0.8]))
    a.grad, b.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.4])   # norm 0.5 < theta: untouched
    clip_gradients([a, b], theta=1.0)
    assert torch.allclose(b.grad, torch.tensor([0.4]))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    clip_gradients([a, b], theta=0)                                   # 0: measure, don't clip
    assert torch.allclose(b.grad, torch.tensor([4.0]))


def test_config_defaults_and_bad_values():
    assert TrainConfig().hidden_size == 512 and TrainConfig(model="gru").hidden_size == 256
    for bad, msg in [(dict(epochs=0), "Epochs"), (dict(epochs=-3), "Epochs"), (dict(batch_size=0), "Batch"),
                     (dict(lr=float("nan")), "Learning rate"), (dict(lr=-1), "Learning rate"),
                     (dict(sampling="shuffled"), "Sampling"), (dict(clip=-1), "Clipping")]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**bad)


def test_short_run_converges_on_the_time_machine(corpus):
    """nn.RNN-256 for 40 epochs: from ~28 (uniform) to well under 9, as the seed's curve does."""
    trainer = Trainer(TrainConfig(model="rnn", epochs=40, seed=0), corpus)
    events = list(trainer.run())
    assert [e.epoch for e in events] == list(range(41))
    assert 20 < events[0].val_ppl < 40                  # untrained: close to a uniform guess (28)
    assert events[-1].train_ppl < 9.0
    assert events[-1].val_ppl < events[0].val_ppl
    assert events[-1].sample.startswith("time traveller") and len(events[-1].sample) == 64
    assert events[10].sample is not None and events[11].sample is None  # samples every 10 epochs
    assert all(e.grad_norm > 0 and 0 <= e.clipped <= 1 for e in events[1:])


def test_random_sampling_resets_state(small_corpus, monkeypatch):
    trainer = Trainer(TrainConfig(model="scratch", hidden_size=8, epochs=1, sampling="random"), small_corpus)
    starts = []
    original = trainer.model.begin_state
    monkeypatch.setattr(trainer.model, "begin_state", lambda b, d=None: starts.append(b) or original(b, d))
    trainer.train_epoch()
    n_batches = len(starts)
    starts.clear()
    trainer.config = TrainConfig(model="scratch", hidden_size=8, epochs=1, sampling="sequential")
    trainer.train_epoch()
    assert n_batches >= 7 and len(starts) == 1   # random: every minibatch; sequential: once


def test_stop_returns_promptly(small_corpus):
    stop = threading.Event()
    trainer = Trainer(TrainConfig(model="rnn", hidden_size=32, epochs=10_000), small_corpus)
    seen = []
    for stats in trainer.run(stop):
        seen.append(stats.epoch)
        if stats.epoch == 3:
            stop.set()
    assert seen == [0, 1, 2, 3] and trainer.epoch == 3


def test_divergence_is_reported_and_last_good_weights_kept(small_corpus):
    trainer = Trainer(TrainConfig(model="rnn", hidden_size=32, lr=1e30, clip=0, epochs=50), small_corpus)
    with pytest.raises(TrainingDiverged, match="diverged"):
        list(trainer.run())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_perplexity_of_a_uniform_model_is_the_vocab_size(small_corpus):
    class Uniform(nn.Module):
        def begin_state(self, b, d=None): return torch.zeros(1)
        def forward(self, X, state): return torch.zeros(X.numel(), 28), state
    assert perplexity(Uniform(), small_corpus.val, 32, "cpu") == pytest.approx(28.0, rel=1e-5)


def test_adam_and_continuing_a_run(small_corpus):
    trainer = Trainer(TrainConfig(model="gru", hidden_size=32, epochs=2, optimizer="adam", lr=0.01), small_corpus)
    list(trainer.run())
    more = list(trainer.run())                        # run again: two more epochs, no epoch-0 event
    assert [e.epoch for e in more] == [3, 4] and trainer.epoch == 4
    assert isinstance(more[-1], EpochStats) and math.isfinite(more[-1].train_ppl)
