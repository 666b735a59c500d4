"""Inspection data: the seed's shapes for every model kind, the concat identity, the parameter
table, and the shipped model reading a sentence of the book."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from charrnn import inspection as ins
from charrnn.checkpoint import load_checkpoint
from charrnn.data import Vocab
from charrnn.models import ModelConfig

DEFAULT = Path(__file__).resolve().parent.parent / "checkpoints" / "default.safetensors"
BOOK = "the time traveller for so it will be convenient to speak of him was expounding a recondite matter to us"
H = 16

# every kind, with bidirectional and several layers where torch.nn allows them
CONFIGS = [("scratch", 1, False), ("rnn", 1, False), ("rnn", 2, True), ("gru", 1, False), ("gru", 2, True),
           ("lstm", 1, False), ("lstm", 2, True)]


@pytest.fixture(scope="module")
def default():
    return load_checkpoint(DEFAULT)


def test_seed_onehot_example():
    """The seed: X = arange(10).reshape(2, 5); one_hot(X.T, 28) is (5, 2, 28)."""
    ex = ins.seed_onehot_example()
    assert ex.X.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert ex.onehot.shape == (5, 2, 28) and not ex.wrapped
    assert ex.code == "X = torch.arange(10).reshape((2, 5))"
    # step t, sequence b lights exactly the column of X[b, t]
    assert torch.equal(ex.onehot.argmax(-1), ex.X.T)
    assert torch.equal(ex.onehot.sum(-1), torch.ones(5, 2, dtype=torch.long))


def test_onehot_example_other_sizes_wrap_ids():
    ex = ins.seed_onehot_example(batch=4, steps=10, vocab_size=28)
    assert ex.onehot.shape == (10, 4, 28) and ex.wrapped and int(ex.X.max()) == 27
    with pytest.raises(ValueError):
        ins.seed_onehot_example(batch=0)


def test_seed_forward_shapes():
    """The seed's scratch RNN-512: Y (10, 28), len(new_state) 1, new_state[0] (2, 512)."""
    ex = ins.seed_onehot_example()
    fw = ins.forward_shapes(ins.demo_model(ModelConfig("scratch", 28, 512)), ex.X)
    assert fw.Y_shape == (10, 28) == (fw.steps * fw.batch, fw.vocab_size)
    assert fw.state_len == 1 and fw.state_shapes == [(2, 512)]


@pytest.mark.parametrize("kind, layers, bidirectional", CONFIGS)
@pytest.mark.parametrize("batch, steps", [(2, 5), (3, 7)])
def test_forward_shapes_every_kind(kind, layers, bidirectional, batch, steps):
    D = 2 if bidirectional else 1
    model = ins.demo_model(ModelConfig(kind, 28, H, layers, bidirectional))
    fw = ins.forward_shapes(model, ins.seed_onehot_example(batch, steps).X)
    assert fw.Y_shape == (steps * batch, 28)
    if kind == "scratch":
        assert (fw.state_len, fw.state_shapes) == (1, [(batch, H)])
    elif kind == "lstm":
        assert fw.state_len == 2 and fw.state_what == "a pair (h, c)"
        assert fw.state_shapes == [(D * layers, batch, H)] * 2
    else:
        assert fw.state_len is None and fw.state_shapes == [(D * layers, batch, H)]


@pytest.mark.parametrize("kind, layers, bidirectional", CONFIGS)
def test_shape_trace_every_kind(kind, layers, bidirectional):
    batch, steps, D = 3, 4, (2 if bidirectional else 1)
    model = ins.demo_model(ModelConfig(kind, 28, H, layers, bidirectional))
    trace = ins.shape_trace(model, ins.seed_onehot_example(batch, steps).X)
    rows = {r.stage: r for r in trace}
    assert rows["input ids X"].shape == (batch, steps) and rows["input ids X"].dtype == "int64"
    assert rows["one-hot(X.T, vocab)"].shape == (steps, batch, 28)
    assert rows[f"H_t, each of t = 1…{steps}"].shape == (batch, D * H)
    assert rows["outputs stacked"].shape == (steps, batch, D * H)
    assert rows["logits Y_hat"].shape == (steps * batch, 28) and rows["logits Y_hat"].dtype == "float32"
    assert rows["targets Y.T.reshape(-1)"].shape == (steps * batch,)
    assert rows["loss = cross_entropy(Y_hat, y)"].shape == ()
    state_out = (batch, H) if kind == "scratch" else (D * layers, batch, H)
    assert rows["state out"].shape == rows["state in (begin_state)"].shape == state_out
    # the stages come in the order of the forward pass
    stages = [r.stage for r in trace]
    order = [stages.index(s) for s in ("input ids X", "outputs stacked", "logits Y_hat", "state out")]
    assert order == sorted(order)


def test_shape_trace_loss_is_the_models():
    """The loss row reports the loss the model really gives on that batch."""
    model = ins.demo_model(ModelConfig("gru", 28, H))
    X = ins.seed_onehot_example(2, 5).X
    Y_hat, _ = model(X, model.begin_state(2))
    loss = F.cross_entropy(Y_hat, ((X + 1) % 28).T.reshape(-1)).item()
    note = next(r.note for r in ins.shape_trace(model, X) if r.stage.startswith("loss"))
    assert f"{loss:.3f}" in note


def test_seed_concise_layer_example():
    """The seed: nn.RNN(28, 256) on (35, 32, 28) gives Y (35, 32, 256) and state (1, 32, 256)."""
    le = ins.layer_example()
    assert le.code == "nn.RNN(28, 256)"
    assert le.X_shape == (35, 32, 28) and le.Y_shape == (35, 32, 256) and le.state_shapes == [(1, 32, 256)]


def test_concise_layer_lstm_state_is_a_pair():
    le = ins.layer_example("lstm", 28, 64, num_layers=2, bidirectional=True, batch=4, steps=6)
    assert le.Y_shape == (6, 4, 128) and le.state_what == "a pair (h, c)"
    assert le.state_shapes == [(4, 4, 64), (4, 4, 64)]
    with pytest.raises(ValueError):
        ins.layer_example("scratch")


@pytest.mark.parametrize("kind, layers, bidirectional", CONFIGS)
def test_parameter_table_counts(kind, layers, bidirectional):
    model = ins.demo_model(ModelConfig(kind, 28, H, layers, bidirectional))
    table = ins.parameter_table(model)
    assert table.total == sum(p.numel() for p in model.parameters())
    assert [r.name for r in table.rows] == [n for n, _ in model.named_parameters()]
    assert all(r.count == math.prod(r.shape) for r in table.rows)


def test_parameter_table_scratch_names_the_seeds():
    table = ins.parameter_table(ins.demo_model(ModelConfig("scratch", 28, 512)))
    assert [(r.name, r.shape) for r in table.rows] == [
        ("W_xh", (28, 512)), ("W_hh", (512, 512)), ("b_h", (512,)), ("W_hq", (512, 28)), ("b_q", (28,))]
    assert table.total == 28 * 512 + 512 * 512 + 512 + 512 * 28 + 28


def test_parameter_table_gates():
    rows = ins.parameter_table(ins.demo_model(ModelConfig("lstm", 28, H))).rows
    ih = next(r for r in rows if r.name == "rnn.weight_ih_l0")
    assert ih.shape == (4 * H, 28) and "i, f, g, o" in ih.role


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_concat_identity(seed):
    ci = ins.concat_identity(seed)
    assert ci.shapes["X"] == (3, 1) and ci.shapes["W_xh"] == (1, 4)
    assert ci.shapes["H"] == (3, 4) and ci.shapes["W_hh"] == (4, 4)
    assert ci.shapes["cat((X, H), 1)"] == (3, 5) and ci.shapes["cat((W_xh, W_hh), 0)"] == (5, 4)
    assert ci.separate.shape == ci.concatenated.shape == (3, 4)
    torch.testing.assert_close(ci.separate, ci.concatenated)
    assert ci.max_abs_diff == (ci.separate - ci.concatenated).abs().max().item() < 1e-5
    # the two results are the formula, not two copies of one tensor
    torch.testing.assert_close(ci.separate, ci.X @ ci.W_xh + ci.H @ ci.W_hh)
    assert ci.separate.abs().max() > 0.1


def test_concat_identity_depends_on_seed():
    assert not torch.equal(ins.concat_identity(0).separate, ins.concat_identity(1).separate)


def test_read_text_on_the_shipped_model(default):
    r = ins.read_text(default.model, default.vocab, BOOK, default.preprocessing)
    n = len(BOOK)
    assert r.chars == list(BOOK) and r.ids == default.vocab.encode(BOOK) and not any(r.unknown)
    assert r.hidden.shape == (n, 512) and r.hidden.abs().max() <= 1.0  # tanh states
    assert len(r.top) == n and all(len(t) == 3 for t in r.top)
    assert all(t[0][1] >= t[1][1] >= t[2][1] for t in r.top)
    assert r.p_next[-1] is None and r.loss[-1] is None and r.n_predictions == n - 1
    # loss and probability agree, and the mean of the losses gives the perplexity
    assert all(abs(math.exp(-l) - p) < 1e-6 for l, p in zip(r.loss[:-1], r.p_next[:-1]))
    assert r.perplexity == pytest.approx(math.exp(sum(r.loss[:-1]) / (n - 1)))
    # the model was trained on this text: far better than guessing among 28 tokens
    assert r.perplexity < 5 < 28
    assert r.honest
    # after "the time travelle" the model expects "r"
    i = BOOK.index("travelle") + len("travelle") - 1
    assert r.top[i][0][0] == "r"


def test_read_text_matches_the_models_loss(default):
    """The per-character losses are the model's cross-entropy on the text, read in one go."""
    r = ins.read_text(default.model, default.vocab, BOOK, "seed")
    ids = torch.tensor([default.vocab.encode(BOOK)])
    with torch.no_grad():
        Y, _ = default.model(ids[:, :-1], default.model.begin_state(1))
    expected = F.cross_entropy(Y, ids[0, 1:], reduction="none")
    torch.testing.assert_close(torch.tensor(r.loss[:-1]), expected, rtol=1e-4, atol=1e-5)


def test_read_text_lowercases_and_flags_unknown(default):
    r = ins.read_text(default.model, default.vocab, "The Time, 1895!", "seed")
    assert "".join(r.chars) == "the time, 1895!"
    assert r.unknown_chars == sorted(set(",1895!"))
    assert [c for c, u in zip(r.chars, r.unknown) if u] == list(",1895!")
    assert all(r.ids[i] == 0 for i, u in enumerate(r.unknown) if u)
    assert r.perplexity is not None


def test_read_text_short_and_empty(default):
    empty = ins.read_text(default.model, default.vocab, "", "seed")
    assert empty.chars == [] and empty.perplexity is None and empty.hidden.shape == (0, 512)
    one = ins.read_text(default.model, default.vocab, "t", "seed")
    assert one.perplexity is None and one.hidden.shape == (1, 512) and len(one.top[0]) == 3
    assert one.loss == [None] and ins.units_by_variance(one.hidden) == list(range(512))


def test_read_text_is_capped(default):
    r = ins.read_text(default.model, default.vocab, "the time machine " * 200, "seed", max_chars=300)
    assert r.truncated and len(r.chars) == 300 and r.hidden.shape == (300, 512)
    assert not ins.read_text(default.model, default.vocab, "the time machine", "seed").truncated


@pytest.mark.parametrize("kind, layers, bidirectional", CONFIGS)
def test_read_text_every_kind(kind, layers, bidirectional):
    vocab = Vocab(list("the time machine"))
    model = ins.demo_model(ModelConfig(kind, len(vocab), H, layers, bidirectional))
    model.train()
    r = ins.read_text(model, vocab, "the machine", "raw", top_k=2)
    assert r.hidden.shape == (11, (2 if bidirectional else 1) * H)
    assert r.honest == (not bidirectional) and all(len(t) == 2 for t in r.top)
    assert model.training  # put back as it was


def test_units_by_variance_and_profile(default):
    r = ins.read_text(default.model, default.vocab, BOOK, "seed")
    order = ins.units_by_variance(r.hidden)
    var = r.hidden.var(dim=0)
    assert sorted(order) == list(range(512))
    assert all(var[a] >= var[b] for a, b in zip(order, order[1:]))
    profile = ins.unit_profile(r, 17)
    assert {c for c, _, _ in profile} == set(BOOK) and sum(k for _, _, k in profile) == len(BOOK)
    means = [m for _, m, _ in profile]
    assert means == sorted(means, reverse=True)
    space = next(m for c, m, _ in profile if c == " ")
    expected = torch.tensor([r.hidden[i, 17].item() for i, c in enumerate(BOOK) if c == " "]).mean().item()
    assert space == pytest.approx(expected, abs=1e-6)


def test_units_by_variance_small():
    hidden = torch.tensor([[0.0, 1.0, 0.5], [0.0, -1.0, 0.4]])
    assert ins.units_by_variance(hidden) == [1, 2, 0]


def test_perplexity_numbers(default):
    r = ins.read_text(default.model, default.vocab, BOOK, "seed")
    pn = ins.perplexity_numbers(r)
    assert (pn.uniform, pn.best) == (28.0, 1.0)
    assert pn.uniform_loss == pytest.approx(math.log(28))
    assert pn.best <= pn.actual < pn.uniform and pn.actual == r.perplexity


def test_thread_settings_are_left_alone(default):
    """torch's thread count is inherited by new threads (a training job's): never lowered here."""
    import threading
    threads = torch.get_num_threads()
    ins.read_text(default.model, default.vocab, BOOK, "seed")
    ins.shape_trace(default.model, ins.seed_onehot_example().X)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start(), t.join()
    assert torch.get_num_threads() == threads and seen == [threads]


# -----------------------------------------------------------------------------
# the step-through: the model's own forward, and autograd's backward

def autograd_oracle(model, X, Y):
    """The seed's loop again, with autograd: each H_t kept, so torch.autograd.grad gives the
    total dloss/dH_t (through the output at t and through every later step)."""
    V = model.config.vocab_size
    params = [model.W_xh, model.W_hh, model.b_h, model.W_hq, model.b_q]
    H, Hs = model.begin_state(X.shape[0])[0], []
    for X_t in F.one_hot(X.T, V).float():                      # (B, V)
        H = torch.tanh(X_t @ model.W_xh + H @ model.W_hh + model.b_h)
        Hs.append(H)
    O = torch.stack(Hs) @ model.W_hq + model.b_q              # (T, B, V)
    loss = F.cross_entropy(O.reshape(-1, V), Y.T.reshape(-1))  # the training loop's mean
    *dHs, = torch.autograd.grad(loss, Hs + params)
    return loss, torch.stack(dHs[:len(Hs)]), dict(zip(["W_xh", "W_hh", "b_h", "W_hq", "b_q"], dHs[len(Hs):]))


@pytest.fixture(params=["untrained", "shipped"])
def scratch(request, default):
    return ins.demo_model(ModelConfig("scratch", 28, H)) if request.param == "untrained" else default.model


def test_step_through_forward_is_the_models(scratch):
    X = ins.seed_onehot_example().X                            # the seed's (2, 5)
    st_ = ins.step_through(scratch, X)
    B, T, h = 2, 5, scratch.config.hidden_size
    assert st_.XW.shape == st_.HW.shape == st_.pre.shape == st_.H.shape == (T, B, h)
    assert st_.onehot.shape == st_.O.shape == st_.P.shape == (T, B, 28)
    with torch.no_grad():
        Hs, state = scratch.features(X, scratch.begin_state(B))  # whatever kernel the model runs
        logits = scratch.head(Hs)                                # (T*B, V)
    torch.testing.assert_close(st_.H, Hs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st_.H[-1], state[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(st_.O.reshape(-1, 28), logits, rtol=1e-4, atol=1e-4)
    # the parts add up, the first step has no history, and the one-hot picks rows of W_xh
    torch.testing.assert_close(st_.pre, st_.XW + st_.HW + scratch.b_h.detach())
    assert torch.equal(st_.HW[0], torch.zeros(B, h))
    torch.testing.assert_close(st_.XW[2], scratch.W_xh.detach()[X[:, 2]])
    torch.testing.assert_close(st_.P.sum(-1), torch.ones(T, B))
    # targets: the next token of 0, 1, 2, ...; for t < T the next input
    assert st_.Y.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert torch.equal(st_.Y[:, :-1], X[:, 1:])


def test_step_through_backward_is_autograds(scratch):
    X = ins.seed_onehot_example().X
    Y = ins.worked_example_targets(X, 28)
    loss, dH, grads = autograd_oracle(scratch, X, Y)
    st_ = ins.step_through(scratch, X)
    assert st_.loss == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(st_.losses.mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st_.dH, dH, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(st_.dH, st_.dH_out + st_.dH_next)
    torch.testing.assert_close(st_.dH_out, st_.dO @ scratch.W_hq.detach().T)
    torch.testing.assert_close(st_.dH_next_norm[-1], torch.tensor(0.0))
    assert torch.equal(st_.dH_next[-1], torch.zeros(2, scratch.config.hidden_size))  # nothing after step T
    for name, g in grads.items():
        torch.testing.assert_close(st_.grads[name], g, rtol=1e-4, atol=1e-7)
    assert st_.dH_norm.shape == (5,)
    torch.testing.assert_close(st_.dH_norm, dH.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("theta", [1.0, 1e-3, 1e3])
def test_step_through_clipping_factor(theta):
    """The factor is min(1, theta/||g||), and the training loop's clip_gradients agrees."""
    from charrnn.train import clip_gradients
    model = ins.demo_model(ModelConfig("scratch", 28, H))
    X = ins.seed_onehot_example().X
    st_ = ins.step_through(model, X, theta=theta)
    assert st_.clip_factor == pytest.approx(min(1.0, theta / st_.grad_norm))
    model.zero_grad()
    Y_hat, _ = model(X, model.begin_state(2))
    F.cross_entropy(Y_hat, ins.worked_example_targets(X, 28).T.reshape(-1)).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = clip_gradients(list(model.parameters()), theta)
    assert st_.grad_norm == pytest.approx(norm.item(), rel=1e-4)
    assert st_.grad_norm == pytest.approx(math.sqrt(sum(v ** 2 for v in st_.grad_norms.values())), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[n] * st_.clip_factor, rtol=1e-4, atol=1e-9)
    assert (st_.clip_factor < 1) == (st_.grad_norm > theta)


def test_step_through_wants_the_scratch_rnn():
    with pytest.raises(ValueError, match="from-scratch"):
        ins.step_through(ins.demo_model(ModelConfig("gru", 28, H)), ins.seed_onehot_example().X)


# -----------------------------------------------------------------------------
# the hidden-state trajectory and its PCA

@pytest.mark.parametrize("n, d", [(50, 8), (6, 30), (40, 2)])
def test_pca_2d_agrees_with_numpy(n, d):
    """Points, components and fractions as a numpy SVD of the centred data gives them (up to sign)."""
    import numpy as np
    rows = torch.randn(n, d, generator=torch.Generator().manual_seed(n * d)) * torch.linspace(3, 0.5, d)
    pca = ins.pca_2d(rows)
    a = rows.double().numpy()
    c = a - a.mean(0)
    U, S, Vt = np.linalg.svd(c, full_matrices=False)
    assert pca.points.shape == (n, 2) and pca.components.shape == (2, d) and pca.explained.shape == (2,)
    np.testing.assert_allclose(pca.explained.numpy(), S[:2] ** 2 / (S ** 2).sum(), rtol=1e-5)
    for k in range(2):
        sign = np.sign(pca.components[k].numpy() @ Vt[k])
        np.testing.assert_allclose(pca.components[k].numpy(), sign * Vt[k], atol=1e-5)
        np.testing.assert_allclose(pca.points[:, k].numpy(), sign * (c @ Vt[k]), rtol=1e-4, atol=1e-5)
    # the fractions: in [0, 1], largest first; the points centred, uncorrelated
    e = pca.explained
    assert 0 <= e[1] <= e[0] <= 1 and e.sum() <= 1 + 1e-6
    torch.testing.assert_close(pca.points.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    assert abs((pca.points[:, 0] * pca.points[:, 1]).mean()) < 1e-4 * pca.points.var(0).max() + 1e-6


def test_pca_2d_is_repeatable_and_degenerate_cases_are_zero():
    rows = torch.randn(20, 5, generator=torch.Generator().manual_seed(1))
    first, again = ins.pca_2d(rows), ins.pca_2d(rows.clone())
    assert torch.equal(first.points, again.points)
    assert all(c[c.abs().argmax()] > 0 for c in first.components)     # the sign rule
    flat = ins.pca_2d(torch.ones(4, 3))                                # no variance at all
    assert torch.equal(flat.explained, torch.zeros(2)) and torch.equal(flat.points, torch.zeros(4, 2))
    one_unit = ins.pca_2d(torch.arange(5.0)[:, None])                  # one direction only
    assert one_unit.explained.tolist() == [1.0, 0.0] and torch.equal(one_unit.points[:, 1], torch.zeros(5))
    assert ins.pca_2d(torch.zeros(0, 3)).points.shape == (0, 2)


def test_hidden_trajectory_on_the_shipped_model(default):
    tr = ins.hidden_trajectory(default.model, default.vocab, BOOK, default.preprocessing)
    n = len(BOOK)
    assert tr.chars == list(BOOK) and tr.points.shape == (n, 2) and tr.units == 512
    assert 0 < tr.explained[1] <= tr.explained[0] < 1 and not tr.truncated and tr.what == "H_t"
    # the points are the read states' own PCA
    reading = ins.read_text(default.model, default.vocab, BOOK, "seed")
    torch.testing.assert_close(tr.points, ins.pca_2d(reading.hidden).points)
    capped = ins.hidden_trajectory(default.model, default.vocab, BOOK * 10, "seed")
    assert capped.truncated and capped.points.shape == (ins.MAX_TRAJECTORY_CHARS, 2)


@pytest.mark.parametrize("kind, layers, bidirectional", CONFIGS)
def test_hidden_trajectory_every_kind(kind, layers, bidirectional):
    vocab = Vocab(list("the time machine"))
    model = ins.demo_model(ModelConfig(kind, len(vocab), H, layers, bidirectional))
    tr = ins.hidden_trajectory(model, vocab, "the time machine", "raw")
    assert tr.points.shape == (16, 2) and tr.explained.shape == (2,) and tr.units == H
    assert 0 <= tr.explained[1] <= tr.explained[0] <= 1 and tr.explained.sum() > 0
    assert ("forward direction" in tr.what) == bidirectional and ("memory cell" in tr.what) == (kind == "lstm")
    if bidirectional:  # the forward half alone: the same states as reading with the backward half cut off
        reading = ins.read_text(model, vocab, "the time machine", "raw")
        torch.testing.assert_close(tr.points, ins.pca_2d(reading.hidden[:, :H]).points)
