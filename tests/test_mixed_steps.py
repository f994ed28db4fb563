"""Mixed steps: decode rows and prompt chunks in one forward pass (Backend.forward, the packed CPU graph), and the
scheduler's plan that fills a step's prompt-token budget."""

from __future__ import annotations

import numpy as np
import pytest

from bundle_format.bundle import load_bundle
from daemon.backend import StepRow
from daemon.backend_onnx import create_cpu_backend
from daemon.sampling import SamplingParams
from daemon.scheduler import Scheduler
from daemon.sequence import Priority, Sequence
from test_engine import Clock, alone, make_engine, run, seq

ATOL = 1e-4


def _prompts(vocab: int, *lengths: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def backends(tiny_bundle):
    """Two backends of the tiny bundle: one driven by forward(), one by separate prefill/decode calls."""
    bundle = load_bundle(tiny_bundle, verify=False)
    pair = create_cpu_backend(bundle, 4, threads=1), create_cpu_backend(bundle, 4, threads=1)
    yield pair, int(bundle.model["vocab_size"])
    for b in pair:
        b.close()


def test_one_forward_pass_equals_separate_prefill_and_decode_calls(backends):
    (mixed, plain), vocab = backends
    a, b, c = _prompts(vocab, 9, 5, 20)
    for backend in (mixed, plain):  # slots 0 and 2 decode; slot 1 is idle inside the span; slot 3 prefills
        backend.prefill(0, a, 0)
        backend.prefill(2, b, 0)
    got = mixed.forward([StepRow(0, [11], 9), StepRow(2, [12], 5), StepRow(3, c[:13], 0)])
    want_chunk = plain.prefill(3, c[:13], 0).copy()
    want_decode = plain.decode([0, 2], [11, 12], [9, 5])
    np.testing.assert_allclose(got[0], want_decode[0], atol=ATOL)
    np.testing.assert_allclose(got[1], want_decode[2], atol=ATOL)
    np.testing.assert_allclose(got[2], want_chunk, atol=ATOL)
    # The rest of the prompt in two chunks, the first wanting no logits, and then in one mixed with a decode row:
    # the same cache either way.
    assert mixed.forward([StepRow(3, c[13:16], 13, logits=0)]).shape == (0, vocab)
    got = mixed.forward([StepRow(3, c[16:], 16), StepRow(0, [5], 10)])
    np.testing.assert_allclose(got[0], plain.prefill(3, c[13:], 13), atol=ATOL)
    for (k1, v1), (k2, v2) in zip(mixed.cache, plain.cache):
        np.testing.assert_allclose(k1[3, :, :20], k2[3, :, :20], atol=ATOL)
        np.testing.assert_allclose(v1[3, :, :20], v2[3, :, :20], atol=ATOL)
        np.testing.assert_array_equal(k1[1], k2[1])  # the idle row inside the span: untouched


def test_a_row_can_ask_for_logits_at_every_position(backends):
    """What verifying drafted tokens needs: a chunk's logits at each of its positions, beside a decode row."""
    (mixed, plain), vocab = backends
    p, q = _prompts(vocab, 6, 4)
    mixed.prefill(1, q, 0)
    plain.prefill(1, q, 0)
    got = mixed.forward([StepRow(1, [7], 4), StepRow(0, p, 0, logits=len(p))]).copy()
    assert got.shape == (1 + len(p), vocab)
    np.testing.assert_allclose(got[0], plain.decode([1], [7], [4])[1], atol=ATOL)
    for i in range(len(p)):
        np.testing.assert_allclose(got[1 + i], plain.prefill(0, [p[i]], i), atol=ATOL)


def test_the_prompt_budget_is_shared_by_several_prompts_and_bounds_the_step():
    sch = Scheduler(slots=4, context_length=64, prefill_chunk_tokens=8)
    clock = Clock()
    a, b, c = (Sequence(list(range(1, n + 1)), SamplingParams(), 4, arrival=clock()) for n in (3, 5, 20))
    sch.add(a)
    plan = sch.schedule(clock())
    assert plan.prefills == [(a, 3)]
    a.cached, a.output_ids = 3, [9]
    sch.add(b)
    sch.add(c)
    plan = sch.schedule(clock())
    # a decodes; b's whole prompt and 3 tokens of c fill the 8-token prompt budget, in one step.
    assert plan.decode == [a] and plan.prefills == [(b, 5), (c, 3)]
    off = Scheduler(slots=4, context_length=64, prefill_chunk_tokens=8, mixed_steps=False)
    for s in (a, b, c):
        off.add(s)
    off.schedule(clock())
    assert len(off.schedule(clock()).prefills) == 1  # without mixed steps: one chunk of one prompt per step


def test_a_higher_class_prompt_takes_the_budget_first():
    sch = Scheduler(slots=3, context_length=64, prefill_chunk_tokens=4)
    low = Sequence(list(range(1, 11)), SamplingParams(), 4, priority=Priority.BACKGROUND, arrival=0.0)
    high = Sequence(list(range(1, 11)), SamplingParams(), 4, priority=Priority.INTERACTIVE, arrival=1.0)
    runner = Sequence([1, 2], SamplingParams(), 4, arrival=0.0)
    sch.add(runner)
    sch.schedule(0.0)
    runner.cached, runner.output_ids = 2, [5]
    sch.add(low)
    sch.add(high)
    plan = sch.schedule(2.0)
    assert plan.prefills == [(high, 4)]


@pytest.mark.parametrize("mixed", [True, False])
def test_mixed_steps_give_each_request_what_it_gets_alone_in_fewer_calls(mixed):
    eng, clock = make_engine(slots=3, chunk=4, mixed_steps=mixed)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    reqs = [seq(p, 12, clock) for p in prompts]
    for s, _ in reqs:
        eng.submit(s)
    run(eng, lambda: all(r.finished for _, r in reqs))
    for p, (_, r) in zip(prompts, reqs):
        assert r.tokens == alone(p, 12)
    shapes = eng.backend.forward_shapes
    if mixed:  # decode rows beside prompt chunks, at most 4 prompt tokens per step
        assert any(1 in s and max(s) > 1 for s in shapes)
        assert all(sum(n for n in s if n > 1) <= 4 for s in shapes[1:])
    else:
        assert shapes == []
