"""What a replica's score for a row depends on (replicas.scorer.OnnxScorer on real onnxruntime). The
gateway merges callers' rows into one call (gateway.serving.batcher), so a row's score should not
depend on its batch-mates: it does not, to float rounding, for rows within float32's range. A row that
overflows float32 inside the model is the exception, and it is onnxruntime's: its LinearClassifier
(what skl2onnx makes of a logistic regression) scores such a row NaN alone, which the gateway answers
UNAVAILABLE, but 0 or 1 in a batch of two or more, which is answered as a score (README, "Hostile
input"). Pinned here so a change in onnxruntime shows up and the README is corrected with it."""

from __future__ import annotations

import hashlib

import numpy as np

from replicas.scorer import OnnxScorer
from tests.harness import small_onnx


def _scorer() -> OnnxScorer:
    onnx, _ = small_onnx(seed=5)
    return OnnxScorer(onnx, hashlib.sha256(onnx).hexdigest())


def test_a_rows_score_does_not_depend_on_its_batch_mates() -> None:
    rows = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32) * 3
    scorer = _scorer()
    batched = scorer.score(rows)
    alone = np.array([scorer.score(rows[i:i + 1])[0] for i in range(len(rows))])
    np.testing.assert_allclose(batched, alone, rtol=1e-6, atol=1e-7)
    shuffled = np.random.default_rng(2).permutation(len(rows))
    np.testing.assert_allclose(scorer.score(rows[shuffled]), batched[shuffled], rtol=1e-6, atol=1e-7)


def test_an_overflowing_row_is_nan_alone_and_finite_with_batch_mates() -> None:
    scorer = _scorer()
    overflow = np.array([[3e38, -3e38, 3e38, -3e38]], np.float32)
    assert np.isnan(scorer.score(overflow)).all()
    mates = np.vstack([overflow, np.zeros((3, 4), np.float32)])
    assert np.isfinite(scorer.score(mates)[0])
