"""Gradient flow through time: the norms against autograd computed another way, every model kind,
the model left alone, sigma_max against an SVD, vanishing and exploding cases, and the training hook."""
import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F

from charrnn import train
from charrnn.errors import UserError
from charrnn.gradflow import GradFlow, gradient_flow, largest_singular_value, probe_batch
from charrnn.models import ModelConfig, build_model, seeded
from charrnn.train import TrainConfig, Trainer


def batch(vocab=5, rows=3, steps=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (rows, steps), generator=g), torch.randint(vocab, (rows, steps), generator=g)


def scaled(model, scale):
    """The model with every weight drawn again from N(0, scale^2), so gradients are far from 0."""
    with torch.no_grad(), seeded(1):
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model


def test_probe_batch_is_fixed_and_spread():
    tokens = torch.arange(100)
    state = torch.random.get_rng_state(), random.getstate()
    X, Y = probe_batch(tokens, 4, 10)
    assert torch.equal(torch.random.get_rng_state(), state[0]) and random.getstate() == state[1]
    assert X.shape == Y.shape == (4, 10) and torch.equal(Y, X + 1)        # Y: the next token
    assert X[0, 0] == 0 and Y[-1, -1] == 99                                # from the start to the last token
    assert torch.equal(X, probe_batch(tokens, 4, 10)[0])
    assert probe_batch(tokens, 1, 10)[0].shape == (1, 10)
    with pytest.raises(UserError):
        probe_batch(torch.arange(5), 2, 10)


def test_scratch_norms_match_rerunning_the_remaining_steps():
    """l_T written as a function of h_t (the steps t+1..T run again from it by the model's own
    loop) and of the one-hot inputs, differentiated by autograd."""
    model = scaled(build_model(ModelConfig("scratch", vocab_size=5, hidden_size=4), kernel="reference"), 0.8)
    X, Y = batch()
    T = X.shape[1]
    flow = gradient_flow(model, X, Y)
    with torch.no_grad():
        Hs, _ = model.features_seed(X, model.begin_state(3))              # (T, batch, h)
    expected = []
    for t in range(1, T + 1):
        H_t = Hs[t - 1].clone().requires_grad_()                          # the state after step t
        H_T = model.features_seed(X[:, t:], (H_t,))[1][0] if t < T else H_t
        loss = F.cross_entropy(model.head(H_T[None]), Y[:, -1])
        expected.append(torch.linalg.vector_norm(torch.autograd.grad(loss, H_t)[0]).item())
    assert flow.h_norms == pytest.approx(expected, rel=1e-5, abs=1e-9)

    x = F.one_hot(X.T, 5).float().requires_grad_()                        # (T, batch, vocab)
    H = torch.zeros(3, 4)
    for x_t in x:                                                         # the seed's equation, written out
        H = torch.tanh(x_t @ model.W_xh + H @ model.W_hh + model.b_h)
    loss = F.cross_entropy(H @ model.W_hq + model.b_q, Y[:, -1])
    (g,) = torch.autograd.grad(loss, x)
    assert flow.x_norms == pytest.approx(torch.linalg.vector_norm(g.flatten(1), dim=1).tolist(), rel=1e-5, abs=1e-9)
    assert flow.loss == pytest.approx(loss.item(), rel=1e-6)
    assert all(n > 0 for n in flow.h_norms)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("layers", [1, 2])
def test_concise_norms_match_the_layer_run_from_h_t(kind, layers):
    """The oracle is torch.nn's own layer, run from the state after step t (every layer's, h and
    c for the LSTM), made a leaf; gradient_flow steps the same weights through torch's cells."""
    model = scaled(build_model(ModelConfig(kind, vocab_size=5, hidden_size=6, num_layers=layers)), 0.7)
    X, Y = batch()
    T = X.shape[1]
    flow = gradient_flow(model, X, Y)
    inputs = F.one_hot(X.T, 5).float()                                    # (T, batch, vocab)
    head = lambda h_top: F.cross_entropy(model.linear(h_top), Y[:, -1])
    expected = []
    for t in range(1, T + 1):
        with torch.no_grad():
            _, state = model.rnn(inputs[:t], model.begin_state(3))
        leaves = [s.clone().requires_grad_() for s in (state if kind == "lstm" else (state,))]
        state = tuple(leaves) if kind == "lstm" else leaves[0]
        if t < T:
            out, _ = model.rnn(inputs[t:], state)                         # (T - t, batch, h)
            loss = head(out[-1])
        else:
            loss = head(leaves[0][-1])                                    # h_T of the top layer
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)      # c_T does not reach l_T
        expected.append(math.sqrt(sum(g.square().sum().item() for g in grads if g is not None)))
    assert flow.h_norms == pytest.approx(expected, rel=1e-5, abs=1e-9)

    x = inputs.clone().requires_grad_()
    out, _ = model.rnn(x, model.begin_state(3))
    (g,) = torch.autograd.grad(head(out[-1]), x)
    assert flow.x_norms == pytest.approx(torch.linalg.vector_norm(g.flatten(1), dim=1).tolist(), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("kind", ["scratch", "rnn", "gru", "lstm"])
@pytest.mark.parametrize("training", [True, False])
def test_every_kind_leaves_the_model_alone(kind, training):
    """Whatever kernel the model trains with (build_model picks the fastest: C loops for the tanh
    RNNs here), the probe runs fp32 autograd and leaves weights, their .grad and the mode alone."""
    model = build_model(ModelConfig(kind, vocab_size=28, hidden_size=32))
    model.train(training)
    params = list(model.parameters())
    for i, p in enumerate(params):                                         # a gradient half-accumulated
        p.grad = torch.full_like(p, float(i)) if i % 2 else None
    before = [(p.detach().clone(), None if p.grad is None else p.grad.clone()) for p in params]
    X, Y = batch(vocab=28, rows=4, steps=7)
    with torch.no_grad():                                                  # as a page may call it
        flow = gradient_flow(model, X, Y)
    assert len(flow.h_norms) == len(flow.x_norms) == 7
    assert all(math.isfinite(v) and v >= 0 for v in flow.h_norms + flow.x_norms)
    assert model.training == training
    for p, (w, g) in zip(params, before):
        assert torch.equal(p, w) and (p.grad is None if g is None else torch.equal(p.grad, g))
    reference = build_model(ModelConfig(kind, vocab_size=28, hidden_size=32), kernel="reference")
    reference.load_state_dict(model.state_dict())
    assert gradient_flow(reference, X, Y) == flow                          # the kernel does not matter


def test_bidirectional_is_refused_in_one_sentence():
    model = build_model(ModelConfig("gru", vocab_size=5, hidden_size=4, bidirectional=True))
    with pytest.raises(UserError, match="unidirectional"):
        gradient_flow(model, *batch())


@pytest.mark.parametrize("kind, hidden, layers, bidirectional", [
    ("scratch", 40, 1, False), ("scratch", 8, 1, False), ("rnn", 40, 2, False),
    ("gru", 24, 1, False), ("lstm", 20, 2, True)])
def test_sigma_max_is_the_largest_singular_value(kind, hidden, layers, bidirectional):
    model = scaled(build_model(ModelConfig(kind, 5, hidden, layers, bidirectional)), 0.3)
    matrices = [model.W_hh] if kind == "scratch" else [
        p for name, p in model.rnn.named_parameters() if name.startswith("weight_hh")]
    assert len(matrices) == layers * (2 if bidirectional else 1)
    exact = max(torch.linalg.svdvals(W.detach())[0].item() for W in matrices)
    assert exact * (1 - 1e-3) < largest_singular_value(model) <= exact * (1 + 1e-6)
    bases = {}                                                  # warm starts from the last vectors
    largest_singular_value(model, bases)
    with torch.no_grad():
        for W in matrices:
            W.mul_(1.5).add_(0.01)
    exact = max(torch.linalg.svdvals(W.detach())[0].item() for W in matrices)
    assert exact * (1 - 1e-3) < largest_singular_value(model, bases) <= exact * (1 + 1e-6)
    with torch.no_grad():
        matrices[0][0, 0] = float("inf")
    assert math.isnan(largest_singular_value(model, bases))


def tanh_rnn(W_hh_scale, input_scale, steps=8, hidden=8):
    """A scratch RNN with W_hh = scale * I and inputs scaled by `input_scale`."""
    model = scaled(build_model(ModelConfig("scratch", vocab_size=5, hidden_size=hidden)), 1.0)
    with torch.no_grad():
        model.W_hh.copy_(W_hh_scale * torch.eye(hidden))
        model.W_xh.mul_(input_scale)
        model.b_h.zero_()
    return model, batch(steps=steps)


def test_vanishing_gradients_shrink_going_back():
    model, (X, Y) = tanh_rnn(0.1, 1.0)
    h = gradient_flow(model, X, Y).h_norms
    assert largest_singular_value(model) == pytest.approx(0.1, rel=1e-4)
    assert all(earlier < 0.11 * later for earlier, later in zip(h, h[1:]))  # at most sigma_max per step


def test_exploding_gradients_grow_going_back():
    """W_hh = 3 I with tiny inputs: the states stay in tanh's linear range, so each step back
    multiplies the gradient by about 3."""
    model, (X, Y) = tanh_rnn(3.0, 1e-6)
    h = gradient_flow(model, X, Y).h_norms
    assert largest_singular_value(model) == pytest.approx(3.0, rel=1e-4)
    assert all(2.9 < earlier / later < 3.0001 for earlier, later in zip(h, h[1:]))


def test_config_rejects_a_bad_cadence():
    assert TrainConfig().probe_every is None and TrainConfig(probe_every=0).probe_every == 0
    for bad in (-1, 1.5, True, "5"):
        with pytest.raises(UserError, match="Gradient probes come every"):
            TrainConfig(probe_every=bad)


@pytest.mark.parametrize("model, sampling", [("scratch", "random"), ("rnn", "sequential")])
def test_probing_does_not_change_training(small_corpus, model, sampling):
    """Bit for bit the same weights with a probe every epoch as with none (the fast C kernel trains
    rnn here, the reference loop scratch)."""
    config = TrainConfig(model=model, hidden_size=24, epochs=3, sampling=sampling, sample_every=10**6,
                         kernel="reference" if model == "scratch" else "auto")
    on = Trainer(dataclasses.replace(config, probe_every=1), small_corpus)
    off = Trainer(dataclasses.replace(config, probe_every=0), small_corpus)
    events_on, events_off = list(on.run()), list(off.run())
    assert all(torch.equal(p, q) for p, q in zip(on.model.parameters(), off.model.parameters()))
    assert [e.train_ppl for e in events_on] == [e.train_ppl for e in events_off]
    assert all(isinstance(e.grad_flow, GradFlow) and len(e.grad_flow.h_norms) == 35 for e in events_on)
    assert all(e.grad_flow is None for e in events_off)
    assert all(e.sigma_max > 0 for e in events_on + events_off)           # every epoch, probes or not
    assert [e.sigma_max for e in events_on] == [e.sigma_max for e in events_off]


def probed(events):
    return [e.epoch for e in events if e.grad_flow is not None]


def test_probe_epochs(small_corpus, monkeypatch):
    """Every N epochs, and always the untrained model and a run's first and last epochs (a run
    continued later probes its own first and last)."""
    config = TrainConfig(model="scratch", hidden_size=8, epochs=5, sample_every=10**6, probe_every=2)
    trainer = Trainer(config, small_corpus)
    assert probed(trainer.run()) == [0, 1, 2, 4, 5]
    trainer.config = dataclasses.replace(config, epochs=4)                 # as jobs continue a run
    events = list(trainer.run())
    assert [e.epoch for e in events] == [6, 7, 8, 9] and probed(events) == [6, 8, 9]
    # auto: by time; a share of 0 allows only the forced probes, a share of 1 one every epoch
    auto = dataclasses.replace(config, probe_every=None)
    monkeypatch.setattr(train, "PROBE_SHARE", 1e-12)
    assert probed(Trainer(auto, small_corpus).run()) == [0, 1, 5]
    monkeypatch.setattr(train, "PROBE_SHARE", 1.0)
    assert probed(Trainer(auto, small_corpus).run()) == [0, 1, 2, 3, 4, 5]


def test_a_bidirectional_run_has_sigma_but_no_flow(small_corpus):
    config = TrainConfig(model="gru", hidden_size=8, bidirectional=True, epochs=1, sample_every=10**6, probe_every=1)
    events = list(Trainer(config, small_corpus).run())
    assert all(e.grad_flow is None and e.sigma_max > 0 for e in events)
