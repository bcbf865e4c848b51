"""Comparing floats computed along two paths (batched and one by one, PyTorch and OpenVINO,
another CPU's instruction set): the error allowed follows the values' scale."""

import numpy as np

FLOAT32_REL = 1e-4    # float32 sums over thousands of terms, taken in another order by another kernel


def assert_close(actual, expected, rel: float = FLOAT32_REL):
    """`actual` equals `expected` within `rel` times the largest magnitude in `expected`
    (at least `rel`: probabilities and values near 0 are judged on a scale of 1)."""
    a = np.asarray(actual.detach().cpu() if hasattr(actual, "detach") else actual, np.float64)
    e = np.asarray(expected.detach().cpu() if hasattr(expected, "detach") else expected, np.float64)
    assert a.shape == e.shape, f"shapes differ: {a.shape} against {e.shape}"
    scale = max(1.0, float(np.abs(e).max(initial=0.0)))
    err = float(np.abs(a - e).max(initial=0.0))
    assert err <= rel * scale, f"largest difference {err:.3g} > {rel:g} x {scale:.3g}"
