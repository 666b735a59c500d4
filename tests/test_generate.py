"""Generation: the seed's greedy predict with warm-up, sampling, and bad arguments."""
import pytest
import torch

from charrnn.data import Vocab
from charrnn.generate import MAX_LENGTH, generate, predict
from charrnn.models import ModelConfig, build_model

VOCAB = Vocab(list("the time traveller said so"))


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model(ModelConfig("scratch", len(VOCAB), 32))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)            # untrained but opinionated: varied predictions
    return m


def seed_predict(prefix, num_preds, net, vocab):
    """The seed's predict_ch8, a character at a time, as the reference."""
    state = net.begin_state(batch_size=1)
    outputs = [vocab[prefix[0]]]
    get_input = lambda: torch.tensor([outputs[-1]]).reshape((1, 1))
    for y in prefix[1:]:
        _, state = net(get_input(), state)
        outputs.append(vocab[y])
    for _ in range(num_preds):
        y, state = net(get_input(), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join([vocab.idx_to_token[i] for i in outputs])


def test_greedy_equals_the_seeds_predict(model):
    with torch.no_grad():
        expected = seed_predict("time traveller", 30, model, VOCAB)
    assert predict("time traveller", 30, model, VOCAB) == expected
    assert expected.startswith("time traveller") and len(expected) >= len("time traveller") + 30


def test_greedy_is_deterministic_and_sampling_repeatable_with_a_seed(model):
    a = generate(model, VOCAB, "the", 40)
    assert a.continuation == generate(model, VOCAB, "the", 40).continuation
    s1 = generate(model, VOCAB, "the", 40, temperature=1.5, seed=7).continuation
    s2 = generate(model, VOCAB, "the", 40, temperature=1.5, seed=7).continuation
    s3 = generate(model, VOCAB, "the", 40, temperature=1.5, seed=8).continuation
    assert s1 == s2 and s1 != s3
    assert generate(model, VOCAB, "the", 40, top_k=1, seed=3).continuation == a.continuation  # top-1 = greedy


def test_unknown_characters_are_flagged_not_fatal(model):
    out = generate(model, VOCAB, "The Time-Machine!", 5)     # seed mode: case folds, '-' and '!' unknown
    assert out.unknown == ["!", "-", "c", "n"]
    assert out.seen_prefix == "the time<unk>ma<unk>hi<unk>e<unk>"
    assert len(out.continuation) == 5
    assert len(out.next_probs) == 10 and abs(sum(p for _, p in out.next_probs) - 1) < 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefix="", length=5), "prefix is empty"),
    (dict(prefix="t", length=-1), "0 or more"),
    (dict(prefix="t", length=MAX_LENGTH + 1), "capped"),
    (dict(prefix="t", length=5, temperature=0), "above 0"),
    (dict(prefix="t", length=5, temperature=-1.0), "above 0"),
    (dict(prefix="t", length=5, top_k=0), "at least 1"),
])
def test_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, VOCAB, **kwargs)


def test_zero_length_gives_the_prefix(model):
    assert generate(model, VOCAB, "the", 0).text == "the"


def test_bidirectional_models_refuse_to_generate():
    m = build_model(ModelConfig("gru", len(VOCAB), 8, bidirectional=True))
    with pytest.raises(ValueError, match="bidirectional"):
        generate(m, VOCAB, "the", 5)


class NoFloat64(torch.Tensor):
    """A CPU tensor standing in for one on a device without float64 (Apple's MPS): making a
    float64 tensor from it fails as it does there, and `.cpu()` gives a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.cpu:
                return args[0].as_subclass(torch.Tensor)
            out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            if out.dtype == torch.float64:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework "
                                "doesn't support float64.")
            return out.as_subclass(cls)      # still "on the device"
        return out


def test_the_fake_device_refuses_float64():
    x = torch.ones(3).as_subclass(NoFloat64)
    with pytest.raises(TypeError, match="float64"):
        x.double()
    assert type(x.float() * 2) is NoFloat64 and type(x.cpu()) is torch.Tensor
    assert x.cpu().double().dtype == torch.float64


def test_sampling_works_where_the_device_has_no_float64(model, monkeypatch):
    """The sampling math runs in float64 on the CPU, never on the model's device; the same
    characters come out as from a CPU model."""
    calls = [dict(), dict(temperature=1.5, seed=7), dict(top_k=3, seed=1), dict(temperature=1e-9, seed=2)]
    expected = [generate(model, VOCAB, "the", 40, **kw).continuation for kw in calls]
    real_forward = model.forward

    def forward(X, state):
        Y, state = real_forward(X, state)
        return Y.as_subclass(NoFloat64), state      # the outputs "live on the device"

    monkeypatch.setattr(model, "forward", forward)
    assert [generate(model, VOCAB, "the", 40, **kw).continuation for kw in calls] == expected


# -----------------------------------------------------------------------------
# the C generation loop (charrnn/kernels/fp32.py, GenerationLoop) against the model's own steps

import re
import types
from pathlib import Path

import charrnn.generate
from charrnn.generate import _native_generator
from charrnn.kernels import fp32

CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default.safetensors"
PREFIXES = ["t", "the time traveller", "said so"]


def _variant_or_skip(variant):
    ok, why = fp32._supported(variant)
    if not ok:
        pytest.skip(f"{variant}: {why}")
    if fp32.load(variant)[0] is None:
        pytest.skip(f"{variant} could not be built here: {fp32.load(variant)[1]}")


@pytest.fixture(params=list(fp32.VARIANTS))
def variant(request):
    _variant_or_skip(request.param)
    return request.param


def _small(kind, kernel="auto", hidden=32, seed=0):
    m = build_model(ModelConfig(kind, len(VOCAB), hidden), seed=seed, kernel=kernel)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + p.numel()))
    return m


def _stepwise(model, vocab, prefix, length):
    """The model's own forward: warm up on the prefix in one call, then one call per character."""
    with torch.no_grad():
        ids = vocab.encode(list(prefix))
        Y, state = model(torch.tensor([ids]), model.begin_state(1))
        out = []
        for _ in range(length):
            out.append(int(Y[-1].argmax()))
            Y, state = model(torch.tensor([[out[-1]]]), state)
    return vocab.decode(out)


def _small_as(kind, variant, hidden=37):
    """A small opinionated model running `variant` as its kernel; the generic C variant is not a
    model kernel, so its model runs torch-fp32 and has a contracting W (rounding-level differences
    in the states then stay at that level)."""
    if variant != "generic-fp32":
        return _small(kind, variant, hidden)
    m = _small(kind, "torch-fp32", hidden)
    with torch.no_grad():
        W = m.W_hh if kind == "scratch" else m.rnn.weight_hh_l0
        W.copy_(W / torch.linalg.matrix_norm(W, 2) * 0.9)
    return m


@pytest.mark.parametrize("kind", ["scratch", "rnn"])
def test_native_greedy_is_the_models_own_greedy_text(kind, variant):
    model = _small_as(kind, variant)                               # h 37: a partial panel in every variant
    for prefix in PREFIXES:
        for length in (0, 1, 2, 500):
            got = generate(model, VOCAB, prefix, length, loop=variant)
            assert got.continuation == _stepwise(model, VOCAB, prefix, length), (prefix, length)
            assert got.path == (f"{variant} loop" if length >= 2 else "python")
            assert got.text == generate(model, VOCAB, prefix, length, loop="python").text


@pytest.mark.parametrize("kind", ["scratch", "rnn"])
def test_auto_runs_the_models_own_c_variant_and_not_under_the_reference(kind):
    for variant in fp32.variants():
        if variant != "generic-fp32" and fp32.load(variant)[0] is not None:
            assert generate(_small(kind, variant), VOCAB, "the", 20).path == f"{variant} loop"
    model = _small(kind, "reference")
    out = generate(model, VOCAB, "the", 500)
    assert out.path == "python" and out.continuation == _stepwise(model, VOCAB, "the", 500)


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="no shipped checkpoint")
def test_native_greedy_on_the_shipped_checkpoint(variant):
    from charrnn.checkpoint import load_checkpoint
    loaded = load_checkpoint(CHECKPOINT)
    for prefix in ("time traveller", "the", "x"):
        got = generate(loaded.model, loaded.vocab, prefix, 500, loop=variant)
        assert got.path == f"{variant} loop"
        assert got.continuation == _stepwise(loaded.model, loaded.vocab, prefix, 500), prefix
    assert generate(loaded.model, loaded.vocab, "time traveller", 500).path.endswith("-fp32 loop")


def test_the_native_step_is_the_c_kernels_step_bit_for_bit(variant):
    """A step of the loop gives the bits Loops.forward gives for a batch of one, for both
    layouts of W (scratch's W_hh, nn.RNN's W_hh.t())."""
    g = torch.Generator().manual_seed(1)
    h, V, steps = 45, 7, 30
    k = fp32.loops(variant)
    E = torch.randn(V, h, generator=g)
    O, bo = torch.randn(h, V, generator=g), torch.randn(V, generator=g)
    for W in (torch.randn(h, h, generator=g) / h ** 0.5, (torch.randn(h, h, generator=g) / h ** 0.5).t()):
        loop = fp32.GenerationLoop(k, E, W, O, bo)
        u = torch.rand(steps, dtype=torch.float64, generator=g)
        hs = torch.randn(h, generator=g).tanh()
        H0 = hs.clone().view(1, h)
        tokens, n = loop.run(hs, None, 2, steps, 1.0, None, u)  # sampling: never stops early
        assert n == steps
        A = E[torch.tensor(tokens[:-1])].view(steps - 1, 1, h).contiguous()
        Hs = k.forward(A, H0, W, threads=1, out=torch.empty(steps - 1, 1, h))
        assert torch.equal(hs, Hs[-1, 0])


@pytest.mark.parametrize("kind", ["scratch", "rnn"])
def test_native_sampling_is_repeatable_and_top1_is_greedy(kind, variant):
    model = _small_as(kind, variant)
    greedy = generate(model, VOCAB, "the", 200, loop=variant).continuation
    runs = [generate(model, VOCAB, "the", 200, temperature=1.5, seed=s, loop=variant) for s in (7, 7, 8)]
    assert runs[0].path == f"{variant} loop"
    assert runs[0].continuation == runs[1].continuation != runs[2].continuation
    assert generate(model, VOCAB, "the", 200, top_k=1, seed=3, loop=variant).continuation == greedy
    assert generate(model, VOCAB, "the", 200, top_k=1, temperature=5.0, seed=3, loop=variant).continuation == greedy
    # the same algorithm as the Python loop: a seed gives the same characters on either path
    for kw in (dict(temperature=1.5, seed=7), dict(top_k=3, seed=1), dict(temperature=1e-9, seed=2),
               dict(temperature=0.7, top_k=5, seed=4)):
        assert (generate(model, VOCAB, "the", 200, loop=variant, **kw).continuation
                == generate(model, VOCAB, "the", 200, loop="python", **kw).continuation), kw


def test_top_k_restricts_the_native_draws(model):
    out = generate(model, VOCAB, "the", 300, top_k=2, temperature=50.0, seed=0)
    assert out.path.endswith("loop")
    ids = VOCAB.encode(re.findall(r"<unk>|.", out.text, re.S))
    with torch.no_grad():                  # every character is one of the two likeliest after the one before
        Y, _ = model(torch.tensor([ids]), model.begin_state(1))
    picked = [ids[t + 1] in torch.topk(Y[t], 2).indices.tolist() for t in range(2, len(ids) - 1)]
    assert all(picked) and len(picked) == 300


def test_sampling_pinned_by_seed_and_algorithm(model):
    """Inverse CDF over softmax(logits / T) with torch.rand(length, float64) from the seed."""
    out = generate(model, VOCAB, "the", 6, temperature=1.0, seed=5, loop="python")
    u = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ids = VOCAB.encode(list("the"))
    with torch.no_grad():
        Y, state = model(torch.tensor([ids]), model.begin_state(1))
        picks = []
        for i in range(6):
            p = torch.softmax(Y[-1].double(), 0)
            picks.append(int((torch.cumsum(p, 0) <= u[i]).sum()))
            Y, state = model(torch.tensor([[picks[-1]]]), state)
    assert out.continuation == VOCAB.decode(picks)
    assert generate(model, VOCAB, "the", 6, temperature=1.0, seed=5).continuation == out.continuation


@pytest.mark.parametrize("config", [ModelConfig("gru", len(VOCAB), 16), ModelConfig("lstm", len(VOCAB), 16),
                                    ModelConfig("rnn", len(VOCAB), 16, num_layers=2)])
def test_other_models_run_the_python_loop(config):
    m = build_model(config, seed=0)
    assert _native_generator(m) is None
    out = generate(m, VOCAB, "the", 20)
    assert out.path == "python" and len(out.continuation) == 20
    assert out.continuation == _stepwise(m, VOCAB, "the", 20)


def test_bidirectional_has_no_native_loop():
    assert _native_generator(build_model(ModelConfig("rnn", len(VOCAB), 8, bidirectional=True))) is None


def test_python_loop_when_the_library_cannot_load(model, monkeypatch):
    expected = generate(model, VOCAB, "the", 50)
    fake = types.SimpleNamespace(VARIANTS=fp32.VARIANTS, variants=fp32.variants, GenerationLoop=fp32.GenerationLoop,
                                 load=lambda variant=None: (None, "no C compiler (test)"))
    monkeypatch.setattr(charrnn.generate, "fp32", fake)       # the model's own kernel still loads
    out = generate(model, VOCAB, "the", 50)
    assert out.path == "python" and out.continuation == expected.continuation
    assert expected.path.endswith("-fp32 loop")


def test_python_loop_for_float64_models():
    m = _small("scratch").double()
    assert _native_generator(m) is None


def test_unknown_loop_is_refused(model):
    with pytest.raises(ValueError, match="generation loop"):
        generate(model, VOCAB, "the", 5, loop="avx9")


def test_ties_in_the_head_are_decided_by_the_models_head(variant):
    """Where the C head's argmax is not certain (here: tied logits every step) the loop stops and
    the model's own head picks; the text is still the model's."""
    model = _small_as("scratch", variant)
    with torch.no_grad():
        model.W_hq[:, 3:] = model.W_hq[:, 2:3]       # tokens 2.. tie at every step
        model.b_q[3:] = model.b_q[2]
    got = generate(model, VOCAB, "the", 60, loop=variant)
    assert got.path == f"{variant} loop"
    assert got.continuation == _stepwise(model, VOCAB, "the", 60)
