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
