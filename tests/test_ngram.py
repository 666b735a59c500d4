"""The n-gram baselines: Kneser–Ney probabilities and perplexities against values worked out by
hand on a three-token text, distributions that sum to 1, no zero probabilities, and the book."""
import math
import random

import pytest

from charrnn.ngram import NGramModel, corpus_ngram_perplexities, ngram_perplexities

A, B, C = 0, 1, 2          # a tiny vocabulary; C never occurs in the training text
TRAIN = [A, A, B]          # "aab"
VAL = [B, A, C]            # "bac"
D = 0.75


def test_unigram_by_hand():
    m = NGramModel(1, 3).fit(TRAIN)
    # counts a:2 b:1, total 3, two types; the discounted mass 0.75*2 is shared uniformly (1/3 each)
    p_a = (2 - D + D * 2 / 3) / 3      # 1.75/3 = 7/12
    p_b = (1 - D + D * 2 / 3) / 3      # 0.75/3 = 1/4
    p_c = (0 + D * 2 / 3) / 3          # 0.5/3  = 1/6: unseen, yet not 0
    assert m.distribution([]) == pytest.approx([p_a, p_b, p_c])
    assert (p_a, p_b, p_c) == pytest.approx((7 / 12, 1 / 4, 1 / 6))
    # training: predict "a" then "b" (the first token is only context)
    assert m.perplexity(TRAIN) == pytest.approx(math.exp(-(math.log(7 / 12) + math.log(1 / 4)) / 2))
    assert m.perplexity(TRAIN) == pytest.approx(math.sqrt(48 / 7))      # 2.6186
    # validation "bac": predict "a" then "c"
    assert m.perplexity(VAL) == pytest.approx(math.sqrt(72 / 7))        # 1/sqrt(7/12 * 1/6) = 3.2071


def test_bigram_by_hand():
    m = NGramModel(2, 3).fit(TRAIN)
    # continuation counts for the unigram level: "a" follows {a}, "b" follows {a}: 1 and 1, total 2
    q_a = (1 - D + D * 2 / 3) / 2      # (0.25 + 0.5)/2 = 0.375
    q_c = (0 + D * 2 / 3) / 2          # 0.25
    assert m.distribution([], order=1) == pytest.approx([7 / 12, 1 / 4, 1 / 6])  # order 1: raw counts
    assert q_a == 0.375 and q_c == 0.25
    # bigrams aa:1 ab:1, so after "a": total 2, two types, the discounted 0.75*2 goes to q
    p_a_after_a = (1 - D + D * 2 * q_a) / 2     # (0.25 + 0.5625)/2 = 0.40625
    p_c_after_a = (0 + D * 2 * q_c) / 2         # 0.1875
    assert m.distribution([A]) == pytest.approx([0.40625, 0.40625, 0.1875])
    assert (p_a_after_a, p_c_after_a) == (0.40625, 0.1875)
    # "b" never precedes anything in training: its row is the continuation unigram
    assert m.distribution([B]) == pytest.approx([0.375, 0.375, 0.25])
    # training "aab": a|a and b|a, both 0.40625
    assert m.perplexity(TRAIN) == pytest.approx(1 / 0.40625)                  # 2.4615
    # validation "bac": a|b = 0.375 (unseen context), c|a = 0.1875 (unseen token)
    assert m.perplexity(VAL) == pytest.approx(1 / math.sqrt(0.375 * 0.1875))  # 3.7712


def test_trigram_by_hand_uses_the_shorter_context_at_the_start():
    m = NGramModel(3, 3).fit(TRAIN)
    # position 1 ("a" after "a") has one token of context: the order-2 model's 0.40625
    # position 2 ("b" after "aa"): the trigram aab is the only one after "aa" (total 1, one type);
    # below it, the bigram level's continuation counts: "ab" is preceded by {a} -> 1 after "a"
    q1_b = 0.375                                  # the continuation unigram, as in the bigram test
    q2_b = (1 - D + D * 1 * q1_b) / 1             # 0.25 + 0.28125 = 0.53125
    p3_b = (1 - D + D * 1 * q2_b) / 1             # 0.25 + 0.3984375 = 0.6484375
    assert m.prob([A, A], B) == pytest.approx(0.6484375) == p3_b
    assert m.prob([A], A) == pytest.approx(0.40625)
    assert m.perplexity(TRAIN) == pytest.approx(1 / math.sqrt(0.40625 * 0.6484375))  # 1.9480


def test_perplexities_match_one_model_per_order(small_corpus):
    train, val = small_corpus.train[:3000], small_corpus.val
    V = len(small_corpus.vocab)
    table = ngram_perplexities(train, val, V)
    assert sorted(table) == [1, 2, 3, 4, 5]
    for n in (1, 3, 5):    # the shared order-5 fit gives what a model of that order alone gives
        alone = NGramModel(n, V).fit(train)
        assert table[n]["train"] == pytest.approx(alone.perplexity(train))
        assert table[n]["val"] == pytest.approx(alone.perplexity(val))
        ids = val.tolist()  # and the counting shortcut equals scoring token by token
        slow = -sum(math.log(alone.prob(ids[max(0, t - n + 1):t], ids[t])) for t in range(1, len(ids)))
        assert table[n]["val"] == pytest.approx(math.exp(slow / (len(ids) - 1)))
    alone = ngram_perplexities(train, None, V, orders=(2,))
    assert list(alone) == [2] and alone[2]["val"] is None
    assert alone[2]["train"] == pytest.approx(table[2]["train"])


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_distributions_sum_to_one_and_are_never_zero(small_corpus, order):
    V = len(small_corpus.vocab)
    m = NGramModel(order, V).fit(small_corpus.train)
    rng = random.Random(order)
    train = small_corpus.train.tolist()
    contexts = [[rng.randrange(V) for _ in range(order - 1)] for _ in range(20)]      # mostly unseen
    contexts += [train[i:i + order - 1] for i in rng.sample(range(len(train) - order), 20)]  # seen
    contexts += [[], train[:1]]                                                       # short ones
    for context in contexts:
        dist = m.distribution(context)
        assert len(dist) == V and sum(dist) == pytest.approx(1, abs=1e-12)
        assert min(dist) > 0                       # <unk> (id 0) never occurs, yet has a share


def test_unseen_validation_token_is_not_zero(small_corpus):
    V = len(small_corpus.vocab)
    m = NGramModel(3, V).fit(small_corpus.train)
    assert 0 not in small_corpus.train.tolist()
    p = m.prob(small_corpus.train[-2:].tolist(), 0)
    assert 0 < p < 1 / V                            # only a part of the uniform share
    ppl = m.perplexity(small_corpus.val[:50].tolist() + [0, 0] + small_corpus.val[50:100].tolist())
    assert math.isfinite(ppl)


def test_higher_orders_fit_training_text_better(small_corpus):
    table = corpus_ngram_perplexities(small_corpus)
    train = [table[n]["train"] for n in (1, 2, 3, 4, 5)]
    assert all(hi < lo for lo, hi in zip(train, train[1:])), train
    assert train[0] > 10 and train[-1] < 2.5, train   # a text of 40 repeated words: 5-grams nearly know it


def test_book_trigram_beats_unigram(corpus):
    table = corpus_ngram_perplexities(corpus, orders=(1, 3))
    assert set(table) == {1, 3}
    assert 14 < table[1]["val"] < 20                   # letter frequencies alone
    assert 5 < table[3]["val"] < 9 and table[3]["val"] < table[1]["val"] * 0.6


def test_bad_input():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        NGramModel(2, 3).fit([0, 1, 3])
    with pytest.raises(ValueError, match="order"):
        NGramModel(0, 3)
    with pytest.raises(RuntimeError, match="Fit"):
        NGramModel(2, 3).prob([0], 1)
    with pytest.raises(ValueError, match="two tokens"):
        NGramModel(2, 3).fit(TRAIN).perplexity([0])
