"""Speculative decoding (daemon/speculative.py): drafting, the verify pass, exactness and the cost ledger.

Exactness runs real tiny models of every supported architecture through the engine on ONNX Runtime: output with
speculation must be token-for-token the output without. An oracle drafter (the known output, with deliberate
mistakes) makes sure long drafts are accepted and rejected at every offset, so the KV cache's rollback is
exercised; prompt lookup runs too.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import DaemonThread, generate
from daemon.backend_onnx import create_cpu_backend
from daemon.config import ConfigError, SpeculativeConfig, parse_config
from daemon.engine import Engine
from daemon.sampling import Sampler, SamplingParams
from daemon.sequence import Conversation, FinishEvent, Priority, Sequence, TokenEvent
from daemon.speculative import PromptLookup, Speculator, Verification
from edgellm.v1 import edgellm_pb2 as pb

VARIANTS = ["llama", "llama3_rope", "llama_linear_rope", "llama_tied", "mistral", "mistral_swa", "qwen2", "qwen3"]
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7, 8, 9, 10, 11, 12, 30, 31, 32]


# ---- prompt lookup --------------------------------------------------------------------------------------------
def test_prompt_lookup_drafts_what_followed_the_longest_latest_match():
    lk = PromptLookup(1, 3)
    lk.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    # "1 2 3" occurred once before (followed by 4 5 9); "2 3" more recently (followed by 7 8): the longest wins.
    assert lk.draft(3) == [4, 5, 9]
    lk.extend([6])
    assert lk.draft(2) == []  # "6" never occurred before
    lk.extend([2, 3])
    assert lk.draft(4) == [6, 2, 3]  # "6 2 3" is new; "2 3" last came before "6 2 3", as far as the tokens go
    lk2 = PromptLookup(2, 2)
    lk2.extend([4, 4, 4])
    assert lk2.draft(5) == [4]  # the match's continuation runs only as far as the tokens go


# ---- engines on tiny models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    from build_engine.build import build_bundle
    from tiny_models import make_tiny_checkpoint

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            made[arch] = build_bundle(make_tiny_checkpoint(root / "ckpt", arch), root / "bundle", context_length=128)
        return made[arch]
    return get


class Oracle:
    """Drafts the known output of each prompt, with a token changed at a random offset in about half the drafts."""

    def __init__(self, truths: dict[tuple[int, ...], list[int]], seed: int = 1):
        self.truths = truths
        self.rng = np.random.default_rng(seed)
        self.drafts = 0

    def catch_up(self, seq, state):
        pass

    def draft(self, seq, state, k):
        truth = self.truths[tuple(seq.prompt_ids)]
        d = list(truth[len(seq.output_ids):len(seq.output_ids) + k])
        if d and self.rng.random() < 0.5:
            j = int(self.rng.integers(len(d)))
            d[j] = (d[j] + 1) % 400
        self.drafts += 1
        return d

    def accepted(self, seq, state):
        pass


class Run:
    """An engine over a real CPU backend, stepped by hand on a frozen clock (the ledger never turns speculation off)."""

    def __init__(self, bundle_path: Path, spec: SpeculativeConfig | None, drafter=None, slots: int = 2,
                 mixed_steps: bool = True):
        from bundle_format.bundle import load_bundle
        from daemon.tokenizer import Tokenizer

        bundle = load_bundle(bundle_path)
        tok = Tokenizer.from_dir(bundle.path, extra_eos_ids=bundle.model["eos_token_ids"])
        self.engine = Engine(create_cpu_backend(bundle, slots, threads=1), tok, bundle.context_length,
                             speculative=spec, drafter=drafter, clock=lambda: 0.0, prefill_chunk_tokens=8,
                             mixed_steps=mixed_steps)

    def submit(self, prompt, n, sampling=None, **kw):
        events: list = []
        seq = Sequence(list(prompt), sampling or SamplingParams(temperature=0), n, sink=events.append, **kw)
        self.engine.submit(seq)
        return seq, events

    def finish(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not (self.engine.scheduler.running or self.engine.scheduler.waiting):
                return
            self.engine.step()
        raise AssertionError("the requests did not finish")


def tokens(events) -> list[int]:
    return [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids]


def finished(events) -> FinishEvent:
    return next(e for e in events if isinstance(e, FinishEvent))


def alone(bundle, prompt, n, spec=None, drafter=None, **kw):
    r = Run(bundle, spec, drafter)
    _, ev = r.submit(prompt, n, **kw)
    r.finish()
    return ev, r.engine.speculator


ON = SpeculativeConfig(enabled=True, ngram_min=1, max_draft_tokens=6, max_batch=4)


@pytest.mark.parametrize("arch", VARIANTS)
def test_greedy_output_is_the_same_with_speculation(tiny_bundles, arch):
    bundle = tiny_bundles(arch)
    plain, _ = alone(bundle, PROMPT, 60, ignore_eos=True)
    truth = tokens(plain)
    assert len(truth) == 60
    oracle = Oracle({tuple(PROMPT): truth})
    ev, sp = alone(bundle, PROMPT, 60, ON, oracle, ignore_eos=True)
    assert tokens(ev) == truth
    # Long drafts were kept and drafts were cut short: both sides of the rollback ran.
    assert sp.accepted > 30 and sp.drafted > sp.accepted and sp.steps < 40
    ev, sp = alone(bundle, PROMPT, 60, ON, ignore_eos=True)  # prompt lookup
    assert tokens(ev) == truth
    assert sp.steps > 0


def test_seeded_sampling_is_the_same_with_speculation(tiny_bundles):
    bundle = tiny_bundles("llama")
    sampling = dict(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=7)
    plain, _ = alone(bundle, PROMPT, 50, sampling=SamplingParams(**sampling), ignore_eos=True)
    truth = tokens(plain)
    ev, sp = alone(bundle, PROMPT, 50, ON, Oracle({tuple(PROMPT): truth}), sampling=SamplingParams(**sampling),
                   ignore_eos=True)
    assert tokens(ev) == truth and sp.accepted > 20


def test_logprobs_are_the_target_models(tiny_bundles):
    bundle = tiny_bundles("qwen2")
    plain, _ = alone(bundle, PROMPT, 30, sampling=SamplingParams(temperature=0, logprobs=3), ignore_eos=True)
    truth = tokens(plain)
    ev, sp = alone(bundle, PROMPT, 30, ON, Oracle({tuple(PROMPT): truth}),
                   sampling=SamplingParams(temperature=0, logprobs=3), ignore_eos=True)
    assert sp.accepted > 10
    want = [lp for e in plain if isinstance(e, TokenEvent) for lp in e.logprobs]
    got = [lp for e in ev if isinstance(e, TokenEvent) for lp in e.logprobs]
    assert [(t, [i for i, _ in top]) for t, _, top in got] == [(t, [i for i, _ in top]) for t, _, top in want]
    np.testing.assert_allclose([lp for _, lp, _ in got], [lp for _, lp, _ in want], atol=1e-4)


def test_stop_string_and_eos_end_where_they_would_without(tiny_bundles):
    bundle = tiny_bundles("llama")
    plain, _ = alone(bundle, PROMPT, 60, ignore_eos=True)
    truth = tokens(plain)
    r = Run(bundle, None)
    text = r.engine.post.detokenizer.decode(truth)
    stop = text[len(text) // 2:len(text) // 2 + 3]  # a stop string in the middle of the output
    for spec, drafter in ((None, None), (ON, Oracle({tuple(PROMPT): truth}))):
        ev, _ = alone(bundle, PROMPT, 60, spec, drafter, stop=(stop,), ignore_eos=True)
        out = "".join(e.text for e in ev if isinstance(e, TokenEvent))
        if spec is None:
            expected = (tokens(ev), out)
        else:
            assert (tokens(ev), out) == expected and finished(ev).reason.value == "stop"
            assert len(tokens(ev)) < 60


def test_max_new_tokens_is_never_passed(tiny_bundles):
    bundle = tiny_bundles("llama")
    plain, _ = alone(bundle, PROMPT, 60, ignore_eos=True)
    truth = tokens(plain)
    for n in (1, 2, 7, 13):
        ev, _ = alone(bundle, PROMPT, n, ON, Oracle({tuple(PROMPT): truth}), ignore_eos=True)
        assert tokens(ev) == truth[:n] and finished(ev).completion_tokens == n


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_batch_mixing_speculative_and_plain_requests(tiny_bundles, monkeypatch, mixed_steps):
    """Verify rows ride in the step's one forward pass with the decode rows and prompt chunks (mixed steps), or
    get a pass of their own (mixed steps off); the output is the same either way."""
    from daemon.backend_onnx import OnnxBackend

    shared = []
    forward = OnnxBackend.forward

    def counting(self, rows):
        shared.append(len(rows) > 1 and any(r.logits > 1 for r in rows))
        return forward(self, rows)

    bundle = tiny_bundles("mistral_swa")
    prompts = [PROMPT, [40, 41, 42, 43, 40, 41], [7, 8, 9]]
    truths = {tuple(p): tokens(alone(bundle, p, 40, ignore_eos=True)[0]) for p in prompts}
    monkeypatch.setattr(OnnxBackend, "forward", counting)
    r = Run(bundle, ON, Oracle(truths), slots=4, mixed_steps=mixed_steps)
    runs = [r.submit(p, 40, ignore_eos=True, speculative=(i != 1)) for i, p in enumerate(prompts)]
    r.finish()
    for p, (seq, ev) in zip(prompts, runs):
        assert tokens(ev) == truths[tuple(p)]
    assert runs[1][0].speculation is None  # the request that opted out never verified a draft
    assert all(s.speculation.accepted > 5 for s, _ in (runs[0], runs[2]))
    assert any(shared) == mixed_steps  # verify rows shared a pass with other rows exactly when steps are mixed


def test_max_batch_keeps_larger_batches_plain(tiny_bundles):
    bundle = tiny_bundles("llama")
    prompts = [PROMPT, [40, 41, 42]]
    truths = {tuple(p): tokens(alone(bundle, p, 20, ignore_eos=True)[0]) for p in prompts}
    r = Run(bundle, SpeculativeConfig(enabled=True, max_batch=1), Oracle(truths), slots=2)
    runs = [r.submit(p, 20, ignore_eos=True) for p in prompts]
    r.finish()
    assert [tokens(ev) for _, ev in runs] == [truths[tuple(p)] for p in prompts]
    # Both decode together from their second step: only the first one's lone steps (while the second's prompt
    # was prefilled) and the tail of the longer one could speculate.
    assert r.engine.speculator.steps < 10


def test_preempted_speculating_request_resumes_exactly(tiny_bundles):
    bundle = tiny_bundles("qwen3")
    urgent_prompt = [60, 61, 62, 63]
    truths = {tuple(p): tokens(alone(bundle, p, 40, ignore_eos=True)[0]) for p in (PROMPT, urgent_prompt)}
    r = Run(bundle, ON, Oracle(truths), slots=1)
    bg, bg_ev = r.submit(PROMPT, 40, ignore_eos=True, priority=Priority.BACKGROUND)
    for _ in range(6):
        r.engine.step()
    assert 0 < len(bg.output_ids) < 40 and bg.speculation.accepted > 0
    urgent, urgent_ev = r.submit(urgent_prompt, 40, ignore_eos=True, priority=Priority.INTERACTIVE)
    r.finish()
    assert finished(bg_ev).preemptions == 1
    assert tokens(bg_ev) == truths[tuple(PROMPT)] and tokens(urgent_ev) == truths[tuple(urgent_prompt)]


def test_conversation_cache_holds_only_kept_tokens(tiny_bundles):
    bundle = tiny_bundles("llama_tied")
    first = tokens(alone(bundle, PROMPT, 20, ignore_eos=True)[0])
    history = [*PROMPT, *first, 70, 71]
    second = tokens(alone(bundle, history, 20, ignore_eos=True)[0])
    r = Run(bundle, ON, Oracle({tuple(PROMPT): first, tuple(history): second}))
    conv = Conversation("c")
    s1, ev1 = r.submit(PROMPT, 20, ignore_eos=True, conversation=conv)
    r.finish()
    assert conv.tokens == [*PROMPT, *first[:-1]]  # the rejected drafts' positions are not in the kept cache
    s2, ev2 = r.submit(history, 20, ignore_eos=True, conversation=conv)
    r.finish()
    assert (tokens(ev1), tokens(ev2)) == (first, second)
    assert finished(ev2).cached_prompt_tokens == len(PROMPT) + len(first) - 1
    assert s1.speculation.accepted > 5 and s2.speculation.accepted > 5


def test_constrained_request_speculates_within_its_grammar(tiny_bundles):
    """A grammar state sees only kept tokens: the drafts' rejected tail never reaches it."""
    from daemon.structured_output import GrammarCompiler, GrammarSpec

    from daemon.tokenizer import Tokenizer

    bundle = tiny_bundles("llama")
    tok = Tokenizer.from_dir(bundle)
    compiler = GrammarCompiler(Path(bundle) / "tokenizer.json", tok.eos_token_ids, tok.vocab_size)
    compiled = compiler.compile(GrammarSpec("regex", "[a-z ]{5,40}"))

    def grammar_run(spec, drafter):
        r = Run(bundle, spec, drafter)
        _, ev = r.submit(PROMPT, 30, grammar=compiler.state(compiled))
        r.finish()
        return ev

    plain = grammar_run(None, None)
    truth = tokens(plain)
    ev = grammar_run(ON, Oracle({tuple(PROMPT): truth}))
    assert tokens(ev) == truth and finished(ev).reason == finished(plain).reason


# ---- speculative sampling keeps the target distribution --------------------------------------------------------
def _target_distribution(logits, params: SamplingParams, seen: list[int]) -> np.ndarray:
    """The distribution the sampler draws from, worked out independently: penalty, temperature, top-k, top-p."""
    x = logits.astype(np.float64).copy()
    for t in set(seen):
        x[t] = x[t] / params.repetition_penalty if x[t] > 0 else x[t] * params.repetition_penalty
    x /= params.temperature
    order = np.argsort(-x)
    keep = order[:params.top_k]
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    cum = np.cumsum(p)
    keep = keep[:int(np.searchsorted(cum, params.top_p)) + 1]
    out = np.zeros_like(x)
    out[keep] = np.exp(x[keep] - x[keep].max())
    return out / out.sum()


class _FakeSeq:
    def __init__(self, prompt):
        self.prompt_ids, self.output_ids, self.cached, self.speculation = prompt, [], 0, None


def test_speculative_sampling_keeps_the_target_distribution():
    """Chi-square over 20000 verify passes: the first token kept has the target's distribution whatever the
    draft, and the draft is accepted with the target's probability of it."""
    rng = np.random.default_rng(0)
    vocab, n = 8, 20000
    row0 = rng.normal(0, 1.5, vocab).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.95, repetition_penalty=1.3, seed=11)
    prompt = [1, 2]
    p = _target_distribution(row0, params, prompt)
    draft_token = int(np.argsort(-p)[1])  # a likely but not the likeliest token
    counts = np.zeros(vocab)
    accepted = 0
    sp = Speculator(SpeculativeConfig(enabled=True), 1000)
    for i in range(n):
        seq = _FakeSeq(prompt)
        seq.sampler = Sampler(dataclasses.replace(params, seed=i), prompt)

        def accept(s, row):
            token, _, _ = s.sampler.sample(row, s.output_ids)
            s.output_ids.append(token)
            return None

        logits = np.stack([row0, row0])  # the second row's value does not matter here
        sp.verify(seq, Verification([draft_token], logits, 0, 0.0), accept)
        counts[seq.output_ids[0]] += 1
        accepted += len(seq.output_ids) == 2
    support = p > 0
    assert counts[~support].sum() == 0  # nothing outside top-k/top-p, ever
    expected = p[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < 22.5, (chi2, counts, expected)  # df <= 6: p < 0.001 beyond 22.46
    rate = accepted / n
    assert abs(rate - p[draft_token]) < 4 * math.sqrt(p[draft_token] * (1 - p[draft_token]) / n)


# ---- the cost ledger -------------------------------------------------------------------------------------------
class _TimedBackend:
    """The engine tests' fake model (tests/test_engine.py) with a clock: a decode costs 1 s, a verify pass `verify_s`."""

    def __init__(self, clock, verify_s):
        from test_engine import FakeBackend

        self.inner = FakeBackend(1)
        self.clock, self.verify_s = clock, verify_s
        self.slots, self.name, self.threads, self.cuda_graphs, self.kv_cache_bytes = 1, "fake", 0, "", 0
        self.max_score_tokens = 64

    def prefill(self, *a):
        return self.inner.prefill(*a)

    def decode(self, *a):
        self.clock.t += 1.0
        return self.inner.decode(*a)

    def score(self, slot, token_ids, start):
        self.clock.t += self.verify_s
        out = np.zeros((len(token_ids), self.inner._logits.shape[1]), np.float32)
        for i, t in enumerate(token_ids):
            self.inner.cache[slot, start + i] = t
            self.inner._next_logits(slot, start + i, out[i])
        return out


class _WrongDrafter:
    """Drafts k copies of a token that is never the next one (the fake model never samples its EOS)."""

    def catch_up(self, seq, state):
        pass

    def draft(self, seq, state, k):
        return [96] * k

    def accepted(self, seq, state):
        pass


@pytest.mark.parametrize("verify_s", [1.5, 4.0])
def test_failing_drafts_cost_at_most_the_allowed_slowdown(verify_s):
    from test_engine import Clock, FakeTokenizer

    def timed(spec):
        clock = Clock()
        eng = Engine(_TimedBackend(clock, verify_s), FakeTokenizer(), 64, speculative=spec,
                     drafter=_WrongDrafter(), clock=clock)
        seq = Sequence([1, 2, 3], SamplingParams(temperature=0), 60, sink=lambda e: None)
        eng.submit(seq)
        start = clock.t
        while eng.scheduler.running or eng.scheduler.waiting:
            eng.step()
        return clock.t - start, eng.speculator, seq.output_ids

    plain_s, _, plain_out = timed(None)
    spec_s, sp, out = timed(SpeculativeConfig(enabled=True, max_slowdown=0.05))
    assert out == plain_out
    assert sp.steps >= 1 and sp.accepted == 0  # it tried, and kept trying now and then
    assert spec_s <= plain_s * 1.05 + verify_s  # within the allowance, give or take the pass that crossed it


def test_good_drafts_keep_speculating():
    from test_engine import Clock, FakeBackend, FakeTokenizer

    def run(backend, clock, spec=None, drafter=None):
        eng = Engine(backend, FakeTokenizer(), 64, speculative=spec, drafter=drafter, clock=clock)
        events: list = []
        eng.submit(Sequence([1, 2, 3], SamplingParams(temperature=0), 40, sink=events.append))
        while eng.scheduler.running or eng.scheduler.waiting:
            eng.step()
        return tokens(events), eng.speculator

    truth, _ = run(FakeBackend(1), Clock())
    clock = Clock()
    out, sp = run(_TimedBackend(clock, 1.5), clock, SpeculativeConfig(enabled=True), Oracle({(1, 2, 3): truth}))
    assert out == truth
    assert sp.steps >= 5 and sp.emitted > 2 * sp.steps


# ---- configuration and the API ---------------------------------------------------------------------------------
def test_config_validates_the_speculative_section():
    cfg = parse_config({"speculative": {"enabled": True, "max_draft_tokens": 5}})
    assert cfg.speculative.enabled and cfg.speculative.max_draft_tokens == 5 and cfg.speculative.ngram_min == 2
    with pytest.raises(ConfigError, match="speculative.ngram_min"):
        parse_config({"speculative": {"ngram_min": 5, "ngram_max": 3}})
    with pytest.raises(ConfigError, match="speculative.max_draft_tokens"):
        parse_config({"speculative": {"max_draft_tokens": 0}})
    with pytest.raises(ConfigError, match="speculative.max_slowdown"):
        parse_config({"speculative": {"max_slowdown": 2.0}})


def test_generate_request_opts_out_through_the_daemon(tiny_bundle, tmp_path):
    d = DaemonThread(tiny_bundle, {"listen": {"unix": str(tmp_path / "s.sock")},
                                   "engine": {"slots": 2}, "speculative": {"enabled": True, "ngram_min": 1}}).start()
    try:
        stub = d.stub()
        prompt = pb.TokenIds(ids=PROMPT * 3)
        sp = d.engine.speculator
        off, _, _ = generate(stub, token_ids=prompt, max_new_tokens=40, ignore_eos=True, speculative=False,
                             sampling=pb.SamplingParams(temperature=0))
        assert sp.steps == 0
        on, _, _ = generate(stub, token_ids=prompt, max_new_tokens=40, ignore_eos=True,
                            sampling=pb.SamplingParams(temperature=0))
        assert on == off
        assert sp.steps > 0  # unset: allowed
    finally:
        d.stop()


# ---- a draft model ---------------------------------------------------------------------------------------------
def _draft_model(bundle_path: Path, target_path: Path, slots: int):
    from bundle_format.bundle import load_bundle
    from daemon.speculative import load_draft_model

    return load_draft_model(str(bundle_path), load_bundle(target_path), slots, 1)


@pytest.mark.parametrize("draft_arch", ["llama", "qwen2"])
def test_draft_model_output_is_the_same_and_its_cache_follows(tiny_bundles, draft_arch):
    """The model itself as its own draft agrees (nearly) always, which holds only while the draft's cache follows
    the kept tokens exactly; another model's drafts are mostly rejected, and the output stays the same."""
    target = tiny_bundles("llama")
    prompts = [PROMPT, [60, 61, 62, 63]]
    truths = {tuple(p): tokens(alone(target, p, 40, ignore_eos=True)[0]) for p in prompts}
    spec = SpeculativeConfig(enabled=True, max_draft_tokens=5)
    r = Run(target, spec, _draft_model(tiny_bundles(draft_arch), target, 1), slots=1)
    # One slot: the second request is preempted mid-way (its draft cache slot is then taken by the first).
    low, low_ev = r.submit(prompts[1], 40, ignore_eos=True, priority=Priority.BACKGROUND)
    for _ in range(5):
        r.engine.step()
    high, high_ev = r.submit(prompts[0], 40, ignore_eos=True, priority=Priority.INTERACTIVE)
    r.finish()
    assert finished(low_ev).preemptions == 1
    assert tokens(high_ev) == truths[tuple(prompts[0])] and tokens(low_ev) == truths[tuple(prompts[1])]
    sp = r.engine.speculator
    assert sp.steps > 5
    if draft_arch == "llama":
        assert sp.accepted >= 0.95 * sp.drafted
    else:
        assert sp.accepted < 0.5 * sp.drafted


def test_draft_model_with_another_tokenizer_is_refused(tiny_bundles, tmp_path):
    import json

    from build_engine.build import build_bundle
    from daemon.config import ConfigError
    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "llama")
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: the same words, other token ids
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))
    other = build_bundle(ckpt, tmp_path / "bundle", context_length=128)
    with pytest.raises(ConfigError, match="another tokenizer"):
        _draft_model(other, tiny_bundles("llama"), 1)


def test_serve_draft_speculates_through_the_daemon(tiny_bundle, tmp_path):
    import socket as pysocket
    import subprocess
    import sys
    import urllib.request

    import grpc

    from edgellm.v1 import edgellm_pb2_grpc as pb_grpc
    from test_cli import Served

    with pysocket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(f"service:\n  metrics: \"127.0.0.1:{port}\"\nprefix_cache:\n  enabled: false\n")
    sock = tmp_path / "s.sock"
    served = Served("--bundle", str(tiny_bundle), "--draft", str(tiny_bundle), "--config", str(config),
                    "--unix", str(sock), "--slots", "1", log=tmp_path / "log")
    try:
        assert served.wait_ready(120), (tmp_path / "log").read_text()
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"unix:{sock}"))
        fields = dict(token_ids=pb.TokenIds(ids=PROMPT), max_new_tokens=30, ignore_eos=True,
                      sampling=pb.SamplingParams(temperature=0))
        plain, _, _ = generate(stub, speculative=False, **fields)
        spec, _, _ = generate(stub, **fields)
        assert spec == plain
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        passes = float(next(line.split()[1] for line in text.splitlines()
                            if line.startswith("edgellm_speculative_passes_total")))
        assert passes > 0
    finally:
        assert served.stop() == 0
    bad = subprocess.run([sys.executable, "-m", "edgellm", "serve", "--bundle", str(tiny_bundle), "--draft",
                          str(tmp_path / "missing"), "--unix", str(tmp_path / "t.sock")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "missing" in bad.stderr and "Traceback" not in bad.stderr


# ---- the backends' verify pass ---------------------------------------------------------------------------------
def test_onnx_score_gives_the_logits_decode_would(tiny_bundle):
    from bundle_format.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    a, b = create_cpu_backend(bundle, 2, threads=1), create_cpu_backend(bundle, 2, threads=1)
    for be in (a, b):
        be.prefill(1, PROMPT, 0)
    step = [40, 41, 42, 43]
    decoded = [a.decode([1], [t], [len(PROMPT) + i])[1].copy() for i, t in enumerate(step)]
    scored = b.score(1, step, len(PROMPT))
    assert scored.shape == (4, bundle.model["vocab_size"])
    np.testing.assert_allclose(scored, np.stack(decoded), atol=1e-4)
    # Rejected positions are simply written over: score again from the middle with other tokens.
    again = b.score(1, [50, 51], len(PROMPT) + 2)
    fresh = create_cpu_backend(bundle, 2, threads=1)
    expected = fresh.prefill(1, [*PROMPT, 40, 41, 50, 51], 0)
    np.testing.assert_allclose(again[-1], expected, atol=1e-4)


def test_a_failing_drafter_leaves_the_request_to_plain_decoding(tiny_bundles):
    class Broken:
        def catch_up(self, seq, state):
            raise RuntimeError("the draft model's session died")

        def draft(self, seq, state, k):
            return []

        def accepted(self, seq, state):
            pass

    bundle = tiny_bundles("llama")
    truth = tokens(alone(bundle, PROMPT, 20, ignore_eos=True)[0])
    ev, sp = alone(bundle, PROMPT, 20, ON, Broken(), ignore_eos=True)
    assert tokens(ev) == truth and finished(ev).reason.value == "length" and sp.steps == 0


def test_engine_without_a_verify_pass_does_not_speculate():
    from test_engine import Clock, FakeBackend, FakeTokenizer

    backend = FakeBackend(1)
    backend.max_score_tokens = 0  # a TensorRT engine compiled before the verify profile
    eng = Engine(backend, FakeTokenizer(), 64, speculative=SpeculativeConfig(enabled=True), clock=Clock())
    assert eng.speculator is None
    done: list = []
    eng.submit(Sequence([1, 2, 3, 1, 2, 3], SamplingParams(temperature=0), 10, sink=done.append))
    while eng.scheduler.running or eng.scheduler.waiting:
        eng.step()
    assert isinstance(done[-1], FinishEvent) and done[-1].completion_tokens == 10


def test_trt_plan_has_a_verify_profile_with_logits_at_every_position():
    from bundle_format.kv_cache import KvCacheLayout
    from bundle_format.trt_plan import (MAX_VERIFY_TOKENS, fill_verify_inputs, optimization_profiles,
                                        packed_input_elements, packed_views, profiles_to_manifest, step_buffer_bytes,
                                        verify_profile)

    layout = KvCacheLayout(num_layers=2, num_kv_heads=2, max_seq=129, head_dim=16, dtype="float16")
    profiles = optimization_profiles(layout, slots=6, max_prefill_tokens=100)
    verify = profiles[verify_profile(6)]
    assert verify_profile(6) == len(profiles) - 1
    assert verify["input_ids"] == ((1, 1), (1, 9), (1, MAX_VERIFY_TOKENS))
    assert verify["logits_indices"] == verify["input_ids"]  # logits at every position
    assert verify["past_key.0"] == ((1, 2, 129, 16),) * 3
    assert profiles_to_manifest(profiles)[-1]["name"] == "verify"
    short = KvCacheLayout(num_layers=2, num_kv_heads=2, max_seq=17, head_dim=16, dtype="float16")
    assert optimization_profiles(short, 1, 8)[-1]["input_ids"][2] == (1, 16)  # never past the cache
    buf = np.zeros(packed_input_elements(1, 5, 5), np.int64)
    views = packed_views(buf, 1, 5, 5)
    fill_verify_inputs(views, np.array([7, 8, 9, 10, 11]), 40)
    assert views["input_ids"].tolist() == [[7, 8, 9, 10, 11]]
    assert views["position_ids"].tolist() == [[40, 41, 42, 43, 44]]
    assert views["write_indices"].tolist() == [40] and views["logits_indices"].tolist() == [[0, 1, 2, 3, 4]]
    vocab = 1000
    extra = step_buffer_bytes(4, vocab, 64, MAX_VERIFY_TOKENS) - step_buffer_bytes(4, vocab, 64)
    assert extra == 8 * packed_input_elements(1, MAX_VERIFY_TOKENS, MAX_VERIFY_TOKENS) + 4 * MAX_VERIFY_TOKENS * vocab
