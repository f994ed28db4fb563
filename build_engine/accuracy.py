"""How much a transformed graph (quantized, lower precision) loses against the fp32 graph, on held-out text.

Both graphs run in ONNX Runtime on the CPU over the same token ids, one prefill with logits at every
position. Reported: each graph's perplexity, their ratio, and how often their top-1 tokens agree.
The build refuses a graph whose loss passes the thresholds below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from build_engine.graph_session import open_session, prefill_feeds

log = logging.getLogger("edgellm.build")

# Largest perplexity ratio (candidate / fp32) and smallest top-1 agreement a build accepts, by precision.
# Set from what the demo model loses at each precision (measured: docs/gpu.md for TensorRT, docs/benchmarks.md
# for the CPU), with room for models that are harder to quantize. int8 is shared by TensorRT's Q/DQ and the CPU's
# weight-only int8; int4 (CPU only) is loose because the demo model's weights come from a 4-bit GGUF.
THRESHOLDS = {
    "fp16": (1.01, 0.97),
    "bf16": (1.03, 0.93),
    "fp8": (1.10, 0.85),
    "int8": (1.12, 0.80),
    "int4": (1.30, 0.60),
}


class AccuracyError(Exception):
    """The transformed graph loses more than the threshold allows."""


@dataclass(frozen=True)
class AccuracyReport:
    tokens: int
    perplexity_reference: float
    perplexity_candidate: float
    top1_agreement: float

    @property
    def perplexity_ratio(self) -> float:
        return self.perplexity_candidate / self.perplexity_reference

    def summary(self) -> str:
        return (f"perplexity {self.perplexity_reference:.3f} -> {self.perplexity_candidate:.3f} "
                f"(ratio {self.perplexity_ratio:.4f}), top-1 agreement {self.top1_agreement:.1%} over {self.tokens} tokens")

    def to_dict(self) -> dict[str, float]:
        return {"tokens": self.tokens, "perplexity_reference": self.perplexity_reference,
                "perplexity_candidate": self.perplexity_candidate, "perplexity_ratio": self.perplexity_ratio,
                "top1_agreement": self.top1_agreement}


def default_text(name: str) -> str:
    """The project's own calibration or held-out text ('calibration' or 'heldout')."""
    return (files("build_engine") / "data" / f"{name}.txt").read_text(encoding="utf-8")


def token_ids(tok_json: str, text: str) -> list[int]:
    """text's token ids under the tokenizer.json in tok_json."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_json).encode(text).ids


def all_position_logits(graph: Path, token_ids: list[int], threads: int = 0) -> np.ndarray:
    """Logits [tokens, vocab] of one prefill of token_ids from an empty cache."""
    sess = open_session(graph, threads)
    return sess.run(["logits"], prefill_feeds(sess, token_ids, list(range(len(token_ids)))))[0][0]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def measure_accuracy(reference: Path, candidate: Path, token_ids: list[int]) -> AccuracyReport:
    """Compare two graphs of the same model on token_ids (which must fit the graphs' context)."""
    ref = all_position_logits(reference, token_ids)
    cand = all_position_logits(candidate, token_ids)
    targets = np.array(token_ids[1:])
    rows = np.arange(len(targets))
    nll_ref = -_log_softmax(ref[:-1])[rows, targets].mean()
    nll_cand = -_log_softmax(cand[:-1])[rows, targets].mean()
    agree = float((ref.argmax(-1) == cand.argmax(-1)).mean())
    return AccuracyReport(len(token_ids), float(np.exp(nll_ref)), float(np.exp(nll_cand)), agree)


def check_accuracy(report: AccuracyReport, precision: str) -> None:
    """Raise AccuracyError when the report passes the precision's thresholds."""
    max_ratio, min_agreement = THRESHOLDS[precision]
    if report.perplexity_ratio > max_ratio or report.top1_agreement < min_agreement:
        raise AccuracyError(f"{precision} loses too much accuracy: {report.summary()}; the limits are a perplexity "
                            f"ratio of at most {max_ratio} and a top-1 agreement of at least {min_agreement:.0%}")


def accuracy_record(report: AccuracyReport, precision: str) -> dict:
    """Log the report; raise AccuracyError past the precision's thresholds, else return the manifest's entry."""
    log.info("%s accuracy on held-out text: %s", precision, report.summary())
    check_accuracy(report, precision)
    max_ratio, min_agreement = THRESHOLDS[precision]
    return {"measured": True, **report.to_dict(), "max_perplexity_ratio": max_ratio,
            "min_top1_agreement": min_agreement}
