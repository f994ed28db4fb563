"""daemon.sampling: greedy, seeding, top-k/top-p/min-p, repetition penalty, logprobs, validation."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.sampling import Sampler, SamplingParams

V = 1000


def random_logits(seed: int, vocab: int = V, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def draw(params: SamplingParams, logits: np.ndarray, n: int, prompt=()) -> list[int]:
    """n tokens from fresh copies of logits (the sampler may modify its row in place)."""
    sampler, out = Sampler(params, prompt), []
    for _ in range(n):
        out.append(sampler.sample(logits.copy(), out)[0])
    return out


def test_greedy_is_argmax():
    sampler = Sampler(SamplingParams(temperature=0.0))
    for seed in range(20):
        logits = random_logits(seed)
        token, logprob, top = sampler.sample(logits.copy(), [])
        assert token == int(np.argmax(logits)) and logprob is None and top == []


def test_same_seed_same_tokens_different_seed_differs():
    logits = random_logits(1, scale=1.0)  # flat enough that draws vary
    params = dict(temperature=1.0, top_p=0.95, top_k=200)
    a = draw(SamplingParams(seed=7, **params), logits, 50)
    assert a == draw(SamplingParams(seed=7, **params), logits, 50)
    assert a != draw(SamplingParams(seed=8, **params), logits, 50)
    assert len(set(a)) > 10  # it really samples


def test_no_seed_is_random():
    logits = random_logits(2, scale=1.0)
    assert draw(SamplingParams(), logits, 30) != draw(SamplingParams(), logits, 30)


def test_top_k_one_is_greedy():
    for seed in range(20):
        logits = random_logits(seed)
        assert draw(SamplingParams(top_k=1, seed=seed), logits, 3) == [int(np.argmax(logits))] * 3


def test_tiny_top_p_is_argmax():
    for seed in range(20):
        logits = random_logits(seed, scale=1.0)
        assert draw(SamplingParams(top_p=1e-6, seed=seed), logits, 3) == [int(np.argmax(logits))] * 3


def test_top_k_and_top_p_sets():
    logits = np.full(V, -10.0, np.float32)
    logits[[3, 5, 7, 9]] = [4.0, 3.0, 2.0, 1.0]
    # top_k=2: only the two best ever come out, both of them do.
    assert set(draw(SamplingParams(top_k=2, seed=0), logits, 300)) == {3, 5}
    # Probabilities ~ .64, .24, .09, .03: top_p=0.8 needs the first two, not the third.
    assert set(draw(SamplingParams(top_p=0.8, seed=0), logits, 300)) == {3, 5}
    assert set(draw(SamplingParams(top_p=0.95, seed=0), logits, 600)) == {3, 5, 7}


def test_top_p_over_a_wide_nucleus():
    """A nucleus bigger than the first partition (64) still comes out right."""
    logits = np.full(V, -30.0, np.float32)
    logits[:300] = 0.0  # 300 equally likely tokens
    tokens = draw(SamplingParams(top_p=0.5, seed=3), logits, 3000)
    assert max(tokens) < 300 and len(set(tokens)) > 140  # about half of the 300


def test_min_p():
    logits = np.full(V, -10.0, np.float32)
    logits[[1, 2, 3]] = [0.0, np.log(0.5), np.log(0.05)]  # relative to the best: 1, .5, .05
    assert set(draw(SamplingParams(min_p=0.1, seed=0), logits, 300)) == {1, 2}
    assert set(draw(SamplingParams(min_p=0.6, seed=0), logits, 50)) == {1}
    assert set(draw(SamplingParams(min_p=0.01, seed=0), logits, 2000)) == {1, 2, 3}


def test_temperature_sharpens_and_flattens():
    logits = np.zeros(V, np.float32)
    logits[0] = 2.0
    cold = draw(SamplingParams(temperature=0.1, seed=0), logits, 200)
    hot = draw(SamplingParams(temperature=5.0, seed=0), logits, 200)
    assert cold.count(0) == 200
    assert hot.count(0) < 20


def test_sampled_frequencies_follow_softmax():
    logits = np.full(V, -40.0, np.float32)
    logits[:3] = np.log([0.6, 0.3, 0.1])
    tokens = draw(SamplingParams(seed=11), logits, 5000)
    freq = np.bincount(tokens, minlength=3)[:3] / len(tokens)
    assert np.allclose(freq, [0.6, 0.3, 0.1], atol=0.03)


def test_large_vocab_frequencies():
    """Vocabularies bigger than a few blocks are drawn block-first; the distribution must not change."""
    vocab = 20_000  # not a multiple of the block size: the last block is partial
    logits = np.full(vocab, -np.inf, np.float32)
    chosen = [0, 1023, 1024, 15_000, vocab - 1]
    probs = np.array([0.3, 0.1, 0.2, 0.15, 0.25])
    logits[chosen] = np.log(probs)
    tokens = draw(SamplingParams(seed=5), logits, 4000)
    assert set(tokens) <= set(chosen)
    freq = np.array([tokens.count(t) for t in chosen]) / len(tokens)
    assert np.allclose(freq, probs, atol=0.03)


def test_top_p_with_a_long_tail():
    """One likely token and 10000 unlikely ones that together hold most of the mass."""
    vocab = 20_000
    logits = np.full(vocab, -np.inf, np.float32)
    logits[0] = 0.0
    logits[1:10_001] = np.log(1e-3)  # each 1/1000 of token 0; together 10x its weight (total 11)
    tokens = draw(SamplingParams(top_p=0.5, seed=9), logits, 1500)
    # The nucleus is token 0 plus 1000 * (0.5 * 11 - 1) = 4500 tail tokens (ties kept in id order).
    assert max(tokens) <= 4501 and tokens.count(0) / len(tokens) == pytest.approx(1 / 5.5, abs=0.03)
    assert len(set(tokens)) > 700


def test_repetition_penalty():
    logits = np.zeros(V, np.float32)
    logits[[10, 20]] = [2.0, 1.8]
    logits[30] = -1.0
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    # Token 10 is in the prompt: 2.0 / 1.5 < 1.8, so 20 wins.
    assert Sampler(greedy, prompt_ids=[10]).sample(logits.copy(), [])[0] == 20
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits.copy(), [])[0] == 10
    # Generated tokens count too, and accumulate across steps without re-reading the sequence.
    sampler = Sampler(greedy)
    assert sampler.sample(logits.copy(), [])[0] == 10
    assert sampler.sample(logits.copy(), [10])[0] == 20
    row = logits.copy()
    assert sampler.sample(row, [10, 20])[0] == 10  # 2.0 / 1.5 beats 1.8 / 1.5
    assert row[10] == pytest.approx(2.0 / 1.5) and row[20] == pytest.approx(1.8 / 1.5)
    # Negative logits are multiplied (made less likely), as in HF.
    row = logits.copy()
    Sampler(greedy, prompt_ids=[30, 10, 10]).sample(row, [])
    assert row[30] == pytest.approx(-1.5) and row[10] == pytest.approx(2.0 / 1.5) and row[20] == pytest.approx(1.8)


def test_logprobs_are_raw_log_softmax():
    logits = random_logits(5)
    expected = log_softmax(logits)
    params = SamplingParams(temperature=0.7, top_k=50, repetition_penalty=1.3, logprobs=5, seed=1)
    sampler = Sampler(params, prompt_ids=[int(np.argmax(logits))])
    token, logprob, top = sampler.sample(logits.copy(), [])
    # Under the unprocessed distribution, despite temperature and penalty.
    assert logprob == pytest.approx(expected[token], abs=1e-5)
    order = np.argsort(-expected)[:5]
    assert [t for t, _ in top] == order.tolist()
    assert [lp for _, lp in top] == pytest.approx(expected[order].tolist(), abs=1e-5)
    greedy = Sampler(SamplingParams(temperature=0, logprobs=1))
    greedy_token, greedy_lp, greedy_top = greedy.sample(logits.copy(), [])
    assert greedy_top == [(greedy_token, pytest.approx(greedy_lp))]
    assert greedy_lp == pytest.approx(expected.max(), abs=1e-5)


def test_masked_logits():
    """-inf entries (padding, constraints) are never chosen and do not break logprobs."""
    logits = random_logits(6)
    logits[::2] = -np.inf
    sampler = Sampler(SamplingParams(seed=0, logprobs=3, top_p=0.9, min_p=0.01))
    for _ in range(50):
        token, logprob, top = sampler.sample(logits.copy(), [])
        assert token % 2 == 1 and np.isfinite(logprob) and all(t % 2 == 1 for t, _ in top)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.1, "temperature must be >= 0"),
    ("temperature", float("nan"), "temperature must be >= 0"),
    ("top_k", -1, "top_k must be >= 0"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    ("min_p", -0.1, r"min_p must be in \[0, 1\]"),
    ("min_p", 1.1, r"min_p must be in \[0, 1\]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("logprobs", 21, r"logprobs must be in \[0, 20\]"),
    ("logprobs", -1, r"logprobs must be in \[0, 20\]"),
])
def test_validate(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value}).validate()
    with pytest.raises(ValueError, match=message):
        Sampler(SamplingParams(**{field: value}))


def test_defaults_valid():
    SamplingParams().validate()
    SamplingParams(temperature=0, top_k=5, top_p=1.0, min_p=1.0, repetition_penalty=0.5, logprobs=20).validate()
