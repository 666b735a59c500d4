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
