"""The engine's measured pace, for the hint given to clients turned away: how long the work already in
the engine takes."""

from __future__ import annotations

import statistics
from collections import deque

from daemon.model_runner import StepStats
from daemon.sequence import Sequence

# Until a step has been measured, the retry hint assumes this many seconds per token (a small CPU's pace).
DEFAULT_TOKEN_S = 0.05
# The retry hint takes the mean of this many recent steps (a mean, since what counts is the total time).
PACE_WINDOW = 64
_RATIO_WEIGHT = 0.1  # weight of the newest finished request in the moving average of the completion ratio


class Pace:
    """Seconds per prompt token prefilled; seconds per decode step (the step's time less its prefill) by the
    number of sequences it decoded, since a step of 4 costs far less than 4 of 1; and the share of
    max_new_tokens that requests end up generating."""

    def __init__(self) -> None:
        self._prefill_token_s: deque[float] = deque(maxlen=PACE_WINDOW)
        self._decode_step_s: dict[int, deque[float]] = {}
        self._completion_ratio = 1.0
        # The last step, timed when the next one starts: (its start, prefill seconds, tokens prefilled, decoded).
        self._last_step: tuple[float, float, int, int] | None = None

    def idle(self) -> None:
        """Time spent idle is no step's."""
        self._last_step = None

    def step_starts(self, now: float) -> None:
        """Record the last step: a prefill's seconds per token, and the rest of it until this one starts for a
        decode of that many sequences. Until this one starts, because the event loop streaming the step's
        tokens takes the GIL in between: that is as much the service's cost as the model."""
        if self._last_step is None:
            return
        start, prefill_s, prefilled, decoded = self._last_step
        if prefilled:
            self._prefill_token_s.append(prefill_s / prefilled)
        if decoded:
            if decoded not in self._decode_step_s:
                self._decode_step_s[decoded] = deque(maxlen=PACE_WINDOW)
            self._decode_step_s[decoded].append(now - start - prefill_s)

    def step_ran(self, started: float, stats: StepStats) -> None:
        self._last_step = (started, stats.prefill_s, stats.prefilled, stats.decoded)

    def finished(self, seq: Sequence) -> None:
        """A request that ended by itself (stop or length): its share of max_new_tokens joins the average."""
        self._completion_ratio += _RATIO_WEIGHT * (len(seq.output_ids) / seq.max_new_tokens - self._completion_ratio)

    def retry_after_s(self, work: list[Sequence], slots: int) -> float:
        """The time `work` (every running and waiting request) takes at the measured pace.

        The work: each request's prompt tokens not yet prefilled, and the tokens it has yet to decode (its
        max_new_tokens, scaled by the share recent requests used). The pace: seconds per prefilled token, and
        per decode step as full as the work allows, shared by the tokens it decodes; where no step that full
        was measured, the nearest size's (a decode step reads the weights once: its time grows little with
        its rows)."""
        prefill = decode = 0
        for s in work:
            prefill += max(s.prefill_target() - s.cached, 0)
            expected = max(round(s.max_new_tokens * self._completion_ratio), 1)
            decode += max(expected - max(len(s.output_ids), 1), 0)  # the first token comes with the prefill
        steps = dict(self._decode_step_s)
        batch = max(min(slots, len(work)), 1)
        nearest = min(steps, key=lambda k: abs(k - batch), default=None)
        prefill_s = statistics.fmean(self._prefill_token_s) if self._prefill_token_s else None
        decode_s = statistics.fmean(steps[nearest]) / batch if nearest else prefill_s or DEFAULT_TOKEN_S
        return max(0.1, prefill * (prefill_s or decode_s) + decode * decode_s)
