"""The scheduler's policy on its own: no backend, no model, no clock but the `now` each step is given.

A test plays the model runner's part by hand: a prefilled chunk moves `cached` to its end in the plan,
a decoded token appends to output_ids and moves `cached` by one.
"""

from __future__ import annotations

import subprocess
import sys

from daemon.sampling import SamplingParams
from daemon.scheduler import Scheduler, StepPlan
from daemon.sequence import Conversation, FinishReason, Priority, Sequence


def seq(prompt, arrival=0.0, priority=Priority.NORMAL, n=10, **kw) -> Sequence:
    return Sequence(list(prompt), SamplingParams(temperature=0), n, arrival=arrival, priority=priority, **kw)


def run_plan(plan: StepPlan, token: int = 1) -> None:
    """What the model runner and postprocessing do to the plan's sequences when every call works."""
    for s, end in plan.prefills:
        s.cached = end
        if s.cached == s.prefill_target() and not s.output_ids:
            s.output_ids.append(token)
    for s in plan.decode:
        s.cached += 1
        s.output_ids.append(token)


def test_the_scheduler_imports_no_numpy_and_no_backend():
    code = "import sys, daemon.scheduler; print(sorted(m for m in sys.modules if m in ('numpy', 'onnxruntime')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_prompt_is_prefilled_whole_alone_and_in_chunks_beside_decodes():
    sch = Scheduler(slots=2, context_length=64, prefill_chunk_tokens=4)
    a = seq(range(1, 11))
    sch.add(a)
    plan = sch.schedule(now=1.0)
    assert plan.admitted == [a] and a.started == 1.0 and a.slot == 0
    assert (plan.prefills[0], plan.decode) == ((a, 10), [])  # nothing decoding: the whole prompt
    run_plan(plan)
    b = seq(range(20, 30), arrival=0.5)
    sch.add(b)
    plan = sch.schedule(now=2.0)
    assert plan.decode == [a] and plan.prefills[0] == (b, 4)  # the chunk budget protects a's pace
    run_plan(plan)
    plan = sch.schedule(now=3.0)
    assert plan.admitted == [] and plan.decode == [a] and plan.prefills[0] == (b, 8)


def test_a_higher_class_preempts_the_latest_lowest_and_it_resumes_by_prefilling_its_outputs():
    # One prompt chunk per step (the two low prompts prefill one after the other): the counts below follow from it.
    sch = Scheduler(slots=2, context_length=64, prefill_chunk_tokens=16, mixed_steps=False)
    low = [seq([1, 2], arrival=t, priority=Priority.BACKGROUND) for t in (1.0, 2.0)]
    for s in low:
        sch.add(s)
    for _ in range(4):
        run_plan(sch.schedule(now=3.0))
    victim = low[1]
    assert len(victim.output_ids) == 3 and victim.cached == 4
    urgent = seq([9], arrival=4.0, priority=Priority.INTERACTIVE)
    sch.add(urgent)
    plan = sch.schedule(now=4.0)
    assert plan.preempted == [victim] and victim.preemptions == 1 and victim.slot is None and victim.cached == 0
    assert urgent.slot == 1 and plan.prefills[0][0] is urgent and sch.waiting == [victim]
    assert plan.decode == [low[0]]
    run_plan(plan)
    sch.finish(urgent, now=5.0)
    plan = sch.schedule(now=5.0)
    # Resumed: the prompt and all outputs but the last are prefilled again; it is not admitted a second time.
    assert plan.prefills[0] == (victim, 2 + 3 - 1) and plan.admitted == []


def test_ended_sequences_leave_before_admission_and_free_their_slots():
    sch = Scheduler(slots=1, context_length=64, prefill_chunk_tokens=16)
    running, cancelled_waiting, late, failed = seq([1]), seq([2]), seq([3], deadline=5.0), seq([4])
    for s in (running, cancelled_waiting, late, failed):
        sch.add(s)
    run_plan(sch.schedule(now=1.0))
    assert running.slot == 0
    running.cancel_requested, running.cancel_message = True, "bye"
    cancelled_waiting.cancel_requested = True
    failed.cancel_requested, failed.failure = True, "handing events to the request failed: X"
    after = seq([5])
    sch.add(after)
    plan = sch.schedule(now=6.0)
    assert {(s.prompt_ids[0], reason, msg) for s, reason, msg in plan.ended} == {
        (1, FinishReason.CANCELLED, "bye"), (2, FinishReason.CANCELLED, ""), (3, FinishReason.DEADLINE, ""),
        (4, FinishReason.ERROR, "handing events to the request failed: X")}
    assert after.slot == 0 and sch.running == [after] and sch.waiting == []  # the freed slot, in the same step


def test_refusing_the_queue_ends_only_requests_without_a_token():
    sch = Scheduler(slots=1, context_length=64, prefill_chunk_tokens=16)
    paused = seq([1], priority=Priority.BACKGROUND)
    sch.add(paused)
    run_plan(sch.schedule(now=1.0))
    sch.add(seq([2], priority=Priority.INTERACTIVE))
    run_plan(sch.schedule(now=2.0))  # paused, with its token
    fresh = seq([3])
    sch.add(fresh)
    sch.refuse_queued("going away")
    plan = sch.schedule(now=3.0)
    assert plan.ended == [(fresh, FinishReason.UNAVAILABLE, "going away")] and sch.waiting == [paused]


def test_a_conversation_keeps_its_cache_between_turns_and_loses_it_to_pressure_or_an_error():
    sch = Scheduler(slots=1, context_length=64, prefill_chunk_tokens=16)
    conv = Conversation("c")
    t1 = seq([1, 2, 3], conversation=conv)
    sch.add(t1)
    for _ in range(3):
        run_plan(sch.schedule(now=1.0), token=7)
    sch.finish(t1, now=2.0)
    assert conv.slot == 0 and not conv.busy and conv.tokens == [1, 2, 3, 7, 7] and conv.last_used == 2.0
    t2 = seq([1, 2, 3, 7, 7, 7, 8], conversation=conv)
    sch.add(t2)
    plan = sch.schedule(now=3.0)
    assert t2.cached_prompt_tokens == 5 and plan.prefills[0] == (t2, 7)
    run_plan(plan)
    sch.finish(t2, now=4.0)
    other = seq([9])
    sch.add(other)
    plan = sch.schedule(now=5.0)
    assert plan.evicted == [conv] and conv.slot is None and conv.evicted and other.slot == 0
    sch.finish(other, now=6.0)
    t3 = seq([1, 2], conversation=conv)
    sch.add(t3)
    run_plan(sch.schedule(now=7.0))
    assert t3.reprefilled and t3.cached_prompt_tokens == 0
    sch.finish(t3, now=8.0, keep_cache=False)  # a failed step may have half-written it
    assert conv.slot is None and sch.held == [] and sch.free_slots == [0]
