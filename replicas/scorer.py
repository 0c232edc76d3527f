"""Loading and running one ONNX version. Kept free of Ray so it can be tested and reused (the
benchmark scores raw onnxruntime with exactly this code)."""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort


class IntegrityError(RuntimeError):
    """The stored ONNX bytes do not hash to the recorded sha256: the artifact was altered."""


class OnnxScorer:
    """One onnxruntime session; scores a float32 batch in a single run and returns P(label = 1)."""

    def __init__(self, onnx_bytes: bytes, expected_sha256: str, *, threads: int = 1) -> None:
        actual = hashlib.sha256(onnx_bytes).hexdigest()
        if actual != expected_sha256:
            raise IntegrityError(f"sha256 mismatch: registry says {expected_sha256}, bytes hash to {actual}")
        opts = ort.SessionOptions()
        # Replicas run at fractional CPUs beside the gateway: one thread each avoids oversubscription.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.input_name = inputs[0].name
        self.n_features = int(inputs[0].shape[1])
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = "probabilities" if "probabilities" in outputs else outputs[-1]

    def score(self, rows: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"rows: expected shape [N, {self.n_features}], got {list(x.shape)}")
        probs = self.session.run([self.output_name], {self.input_name: x})[0]
        return np.asarray(probs[:, 1] if probs.ndim == 2 else probs, dtype=np.float64)
