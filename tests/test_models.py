"""Models: the oracle test against torch.nn, every fp32 kernel against the seed's loop, shapes for
every kind."""
import pytest
import torch
from torch import nn

from charrnn import kernels
from charrnn.kernels.fused import cudnn_tanh_layer, tanh_rnn_layer
from charrnn.models import KINDS, ModelConfig, RNNModel, RNNScratch, build_model, detach_state

V, H, B, S = 28, 16, 3, 5
# every fp32 kernel that runs the tanh RNNs on this CPU (the C ones where they build)
FP32 = [name for name, why in kernels.choices(ModelConfig("scratch", V, H), "cpu").items()
        if why is None and not name.endswith("-bf16")]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def run(model, X, state):
    Y, state = model(X, state)
    (Y.square().sum() + state_sum(state)).backward()  # a loss that reaches outputs and final state
    return Y.detach(), state


def state_sum(state):
    return sum(s.square().sum() for s in state) if isinstance(state, tuple) else state.square().sum()


@pytest.mark.parametrize("kernel", FP32)
def test_scratch_matches_nn_rnn(kernel):
    """Oracle: the from-scratch RNN with weights copied from nn.RNN gives nn.RNN's outputs and gradients."""
    torch.manual_seed(0)
    ref = nn.RNN(V, H)
    out = nn.Linear(H, V)
    ours = RNNScratch(ModelConfig("scratch", V, H))
    ours.kernel = kernels.select(ours.config, "cpu", name=kernel)
    with torch.no_grad():
        ours.W_xh.copy_(ref.weight_ih_l0.T)
        ours.W_hh.copy_(ref.weight_hh_l0.T)
        ours.b_h.copy_(ref.bias_ih_l0 + ref.bias_hh_l0)
        ours.W_hq.copy_(out.weight.T)
        ours.b_q.copy_(out.bias)
    X, H0 = batch(), torch.randn(B, H) * 0.5
    Y_ref, h_ref = ref(nn.functional.one_hot(X.T, V).float(), H0.unsqueeze(0))
    logits_ref = out(Y_ref.reshape(-1, H))
    (logits_ref.square().sum() + h_ref.square().sum()).backward()
    Y, (h,) = run(ours, X, (H0,))
    torch.testing.assert_close(Y, logits_ref.detach())
    torch.testing.assert_close(h, h_ref[0].detach())
    torch.testing.assert_close(ours.W_hh.grad, ref.weight_hh_l0.grad.T)
    torch.testing.assert_close(ours.W_xh.grad, ref.weight_ih_l0.grad.T)
    torch.testing.assert_close(ours.b_h.grad, ref.bias_hh_l0.grad)
    torch.testing.assert_close(ours.W_hq.grad, out.weight.grad.T)


@pytest.mark.parametrize("kernel", [k for k in FP32 if k != "reference"])
@pytest.mark.parametrize("kind, layers", [("scratch", 1), ("rnn", 1), ("rnn", 3)])
def test_fused_equals_step_loop(kind, layers, kernel):
    """Every fused kernel gives the seed's loop's outputs, state and gradients."""
    cfg = ModelConfig(kind, V, H, num_layers=layers)
    torch.manual_seed(1)
    slow = build_model(cfg, kernel="reference")
    fast = build_model(cfg, kernel=kernel)
    fast.load_state_dict(slow.state_dict())
    X = batch(1)
    state = slow.begin_state(B)
    state = tuple(s + 0.3 for s in state) if isinstance(state, tuple) else state + 0.3
    Y0, s0 = run(slow, X, state)
    Y1, s1 = run(fast, X, state)
    torch.testing.assert_close(Y1, Y0)
    torch.testing.assert_close(s1, s0)
    g0, g1 = grads(slow), grads(fast)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)


def test_scratch_on_cudnns_rnn_equals_step_loop(monkeypatch):
    """On a GPU the scratch model's fused path is cuDNN's tanh RNN on its own parameters; the
    same call runs on the CPU (PyTorch's own kernel), so the mapping is checked here."""
    cfg = ModelConfig("scratch", V, H)
    torch.manual_seed(1)
    slow = build_model(cfg, kernel="reference")
    fast = build_model(cfg, kernel="reference")
    fast.load_state_dict(slow.state_dict())
    fast.kernel = kernels.Kernel("cudnn", layer=lambda *args: cudnn_tanh_layer(*args)[0])
    X, state = batch(1), (slow.begin_state(B)[0] + 0.3,)
    Y0, s0 = run(slow, X, state)
    Y1, s1 = run(fast, X, state)
    torch.testing.assert_close(Y1, Y0)
    torch.testing.assert_close(s1, s0)
    g0, g1 = grads(slow), grads(fast)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], msg=name)


@pytest.mark.parametrize("ids", [True, False])
def test_fused_layer_passes_gradcheck(ids):
    dbl = dict(dtype=torch.double, requires_grad=True)
    X = torch.tensor([[0, 2], [1, 1], [2, 0], [1, 2]]) if ids else torch.randn(4, 2, 5, **dbl)
    W_in = torch.randn(3 if ids else 5, 3, **dbl)
    b, H0, W = torch.randn(3, **dbl), torch.randn(2, 3, **dbl), torch.randn(3, 3, **dbl)
    assert torch.autograd.gradcheck(tanh_rnn_layer, (X, W_in, b, H0, W))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_shapes_for_every_kind(kind, bidirectional):
    if kind == "scratch" and bidirectional:
        with pytest.raises(ValueError, match="one unidirectional layer"):
            ModelConfig(kind, V, H, bidirectional=True)
        return
    layers = 1 if kind == "scratch" else 2
    cfg = ModelConfig(kind, V, H, num_layers=layers, bidirectional=bidirectional)
    model = build_model(cfg)
    state = model.begin_state(B)
    Y, new_state = model(batch(), state)
    assert Y.shape == (S * B, V)
    D = 2 if bidirectional else 1
    if kind == "scratch":
        assert isinstance(new_state, tuple) and len(new_state) == 1 and new_state[0].shape == (B, H)
    elif kind == "lstm":
        assert isinstance(new_state, tuple) and [s.shape for s in new_state] == [(D * layers, B, H)] * 2
    else:
        assert new_state.shape == (D * layers, B, H)
    Hs, _ = model.features(batch(), state)
    assert Hs.shape == (S, B, D * H)
    assert cfg.can_generate == (not bidirectional)
    assert all(not s.requires_grad for s in (detach_state(new_state) if isinstance(new_state, tuple)
                                             else (detach_state(new_state),)))


def test_seed_concise_example_shapes():
    """The seed: nn.RNN(28, 256) on (35, 32, 28) gives Y (35, 32, 256) and state (1, 32, 256)."""
    m = RNNModel(ModelConfig("rnn", 28, 256))
    Y, state = m.rnn(torch.rand(35, 32, 28), m.begin_state(32))
    assert Y.shape == (35, 32, 256) and state.shape == (1, 32, 256)


def test_scratch_init_is_the_seeds():
    torch.manual_seed(0)
    m = RNNScratch(ModelConfig("scratch", V, 512))
    assert torch.count_nonzero(m.b_h) == 0 and torch.count_nonzero(m.b_q) == 0
    assert 0.008 < m.W_hh.std().item() < 0.012


@pytest.mark.parametrize("bad, message", [
    (dict(kind="transformer"), "Unknown model"),
    (dict(hidden_size=0), "Hidden size"),
    (dict(kind="rnn", num_layers=0), "Layers"),
    (dict(kind="scratch", num_layers=2), "one unidirectional layer"),
])
def test_bad_configs(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**({"vocab_size": V} | bad))
