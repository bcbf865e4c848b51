"""Learning curves: accuracy against images per class, and how many images a target needs.

The model is the inverse power law used for sample-size planning,

    accuracy(n) = a - b * n ** (-c),    a <= 1, b >= 0, c > 0,

where `a` is the accuracy the curve approaches with unlimited data. For a fixed
`c` the law is linear in (a, b), so the fit is a least-squares solve on a grid of
`c`: no optimiser to diverge, and the same answer every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

C_GRID = np.concatenate([np.linspace(0.05, 1.0, 96), np.linspace(1.02, 4.0, 150)])
FAR = 10.0  # an estimate beyond FAR x the largest size measured is an extrapolation too far


@dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    c: float
    rmse: float

    def __call__(self, n) -> np.ndarray:
        return self.a - self.b * np.power(np.asarray(n, dtype=float), -self.c)

    def size_for(self, target: float) -> float | None:
        """Images per class at which the curve reaches `target`; None if it never does."""
        if target >= self.a or self.b <= 0:
            return None if target >= self.a else 1.0
        return float((self.b / (self.a - target)) ** (1.0 / self.c))

    def to_dict(self) -> dict:
        return {"a": round(self.a, 6), "b": round(self.b, 6), "c": round(self.c, 4), "rmse": round(self.rmse, 6)}


def fit_power_law(n, acc, weights=None) -> PowerLaw:
    """Least-squares inverse power law through (n, acc); needs at least 3 distinct sizes."""
    n = np.asarray(n, dtype=float)
    acc = np.asarray(acc, dtype=float)
    if len(np.unique(n)) < 3:
        raise ValueError("a learning curve needs at least 3 different sizes")
    w = np.ones_like(acc) if weights is None else np.asarray(weights, dtype=float)
    sw = np.sqrt(w)
    best = None
    for c in C_GRID:
        x = np.power(n, -c)
        A = np.stack([np.ones_like(x), -x], axis=1) * sw[:, None]
        (a, b), *_ = np.linalg.lstsq(A, acc * sw, rcond=None)
        if a > 1.0:                      # accuracy cannot approach more than 100%: refit with a = 1
            a = 1.0
            b = float(np.sum(w * x * (1.0 - acc)) / max(np.sum(w * x * x), 1e-12))
        b = max(float(b), 0.0)
        err = float(np.sqrt(np.sum(w * (a - b * x - acc) ** 2) / np.sum(w)))
        if best is None or err < best.rmse - 1e-12:
            best = PowerLaw(float(a), b, float(c), err)
    return best


def estimate_size(sizes, scores_by_size: dict, target: float, boots: int = 500, seed: int = 0) -> dict:
    """Fit the curve to the mean score per size and estimate the images per class for
    `target`, with an 80% interval from a bootstrap over the repeats of each size.
    Says plainly when the data cannot support an estimate."""
    sizes = sorted(int(s) for s in sizes)
    means = [float(np.mean(scores_by_size[s])) for s in sizes]
    out = {"target": target, "sizes": sizes, "mean": means}
    try:
        law = fit_power_law(sizes, means)
    except ValueError as exc:
        return {**out, "estimate": None, "statement": f"cannot estimate: {exc}"}
    out["fit"] = law.to_dict()
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(boots):
        resampled = [float(np.mean(rng.choice(scores_by_size[s], size=len(scores_by_size[s])))) for s in sizes]
        n_t = fit_power_law(sizes, resampled).size_for(target)
        boot.append(np.inf if n_t is None else n_t)
    boot = np.array(boot)
    reach = float(np.mean(np.isfinite(boot)))
    estimate = law.size_for(target)
    largest = max(sizes)
    out["reachable_fraction"] = round(reach, 3)
    # Measured first: from the smallest size on which every larger size also meets the target.
    reached = [s for i, s in enumerate(sizes) if all(m >= target for m in means[i:])]
    if reached:
        return {**out, "estimate": float(reached[0]), "interval": None,
                "statement": f"reached: from {reached[0]} images per class on, every size measured averages "
                             f"{target:.2%} or more"}
    if estimate is None:
        statement = (f"the curve levels off at {law.a:.2%}, below the target {target:.2%}: more images of the "
                     f"same kind are unlikely to get there; change the recipe, the images or the target")
        return {**out, "estimate": None, "interval": None, "statement": statement}
    huge = np.finfo(float).max
    lo, hi = np.percentile(np.where(np.isfinite(boot), boot, huge), [10, 90])
    interval = [None if lo >= huge else float(np.ceil(lo)), None if hi >= huge else float(np.ceil(hi))]
    out.update(estimate=float(np.ceil(estimate)), interval=interval)
    if estimate > FAR * largest:
        out["statement"] = (f"more than {FAR * largest:.0f} images per class ({FAR:.0f}x the largest size "
                            f"measured, {largest}): the curve cannot say how many more; measure larger sizes")
    elif interval[1] is None or interval[0] is None:
        out["statement"] = (f"about {np.ceil(estimate):.0f} images per class, but in {1 - reach:.0%} of bootstrap "
                            f"fits the target is never reached: treat it as uncertain")
    else:
        out["statement"] = (f"about {np.ceil(estimate):.0f} images per class "
                            f"(80% interval {interval[0]:.0f} to {interval[1]:.0f})")
    return out


def extrapolation_check(sizes, scores_by_size: dict, hold_out: int = 2) -> dict | None:
    """Fit on all but the `hold_out` largest sizes, predict those, report the error."""
    sizes = sorted(int(s) for s in sizes)
    fit_sizes, check = sizes[:-hold_out], sizes[-hold_out:]
    if len(fit_sizes) < 3 or not check:
        return None
    law = fit_power_law(fit_sizes, [float(np.mean(scores_by_size[s])) for s in fit_sizes])
    rows = [{"size": s, "predicted": round(float(law(s)), 5),
             "measured": round(float(np.mean(scores_by_size[s])), 5),
             "error_points": round(float(law(s) - np.mean(scores_by_size[s])) * 100, 2)} for s in check]
    return {"fit_sizes": fit_sizes, "fit": law.to_dict(), "predictions": rows,
            "max_abs_error_points": max(abs(r["error_points"]) for r in rows)}
