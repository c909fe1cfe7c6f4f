"""Paired statistics for before/after comparisons on the same items, and intervals over a few seeds.

- `paired_change`: the change in accuracy between two 0/1 vectors over the same items, the right→wrong /
  wrong→right counts and an exact McNemar p-value (a binomial test on the discordant items). Its interval is the
  paired bootstrap's (items resampled, the same draw for both), widened where needed to contain the exact
  conditional interval (Clopper–Pearson on how the discordant items split, times their share): with few discordant
  items the percentile bootstrap is too narrow (5 right→wrong and none back gives [−1.0, −0.1] on 1,000 items while
  the exact test gives p = 0.06), and an interval that excludes 0 must mean the exact test rejects. The point
  estimate is the observed difference, never a mean of replicates.
- `seed_interval`: a t-interval over per-seed estimates, widened by the within-seed sampling error, for 2–5 seeds
  (a bootstrap over three seeds would claim a precision three numbers cannot give).
- `detectable_drop`: the smallest paired change detected with 80 % power at a given discordance.

Pure numpy and the standard library: no model, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
REPLICATES = 2000


@dataclass(frozen=True)
class Change:
    """Accuracy before and after on the same `n` items, in percentage points."""

    n: int
    before: float
    after: float
    delta: float
    low: float
    high: float
    right_to_wrong: int
    wrong_to_right: int
    p_value: float  # exact McNemar (two-sided)

    @property
    def discordant(self) -> int:
        return self.right_to_wrong + self.wrong_to_right

    def beyond(self, points: float) -> bool:
        """The drop is larger than `points` with confidence: the whole interval lies below −points."""
        return self.high < -points

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def paired_change(
    before: np.ndarray | list, after: np.ndarray | list, replicates: int = REPLICATES, seed: int = 0
) -> Change:
    """Change in accuracy (after − before, points) over the same items, with a paired bootstrap interval."""
    b = np.asarray(before, dtype=float)
    a = np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"paired_change: before {b.shape} and after {a.shape} must be the same 1-D length")
    n = len(b)
    if n == 0:
        raise ValueError("paired_change: no items")
    diff = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(replicates, n))
    reps = 100 * diff[idx].mean(1)
    lo, hi = np.quantile(reps, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    r2w, w2r = int(((b == 1) & (a == 0)).sum()), int(((b == 0) & (a == 1)).sum())
    m = r2w + w2r
    if m:  # the change is (w2r − r2w) / n = m/n · (1 − 2π), π = P(right→wrong | discordant)
        p_lo, p_hi = clopper_pearson(r2w, m)
        lo, hi = min(lo, 100 * m / n * (1 - 2 * p_hi)), max(hi, 100 * m / n * (1 - 2 * p_lo))
    return Change(
        n=n,
        before=100 * float(b.mean()),
        after=100 * float(a.mean()),
        delta=100 * float(diff.mean()),
        low=float(lo),
        high=float(hi),
        right_to_wrong=r2w,
        wrong_to_right=w2r,
        p_value=mcnemar_exact(r2w, w2r),
    )


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion from k successes in n trials."""
    alpha = 1 - level

    def quantile(q: float, a: float, b: float) -> float:  # of Beta(a, b), by bisection on its CDF
        lo, hi = 0.0, 1.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _betainc(a, b, mid) < q else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if k == 0 else quantile(alpha / 2, k, n - k + 1)
    high = 1.0 if k == n else quantile(1 - alpha / 2, k + 1, n - k)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven) for b + c discordant pairs at p = 1/2."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student t quantile (1 − (1 − level)/2) for small df, by bisection on the regularised incomplete
    beta function (no scipy)."""
    target = 1 - (1 - level) / 2

    def cdf(t: float) -> float:
        x = df / (df + t * t)
        return 1 - 0.5 * _betainc(df / 2, 0.5, x)

    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes' betacf, written anew)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for num in (even, odd):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1) < 1e-12:
            break
    return front * f / a


def seed_interval(estimates: list[float], within_se: list[float] | None = None) -> tuple[float, float, float]:
    """(mean, low, high) over per-seed estimates: a t-interval with df = seeds − 1 on the seed-to-seed spread; with
    `within_se` (each seed's own standard error from resampling its items), the variance is max(between-seed
    variance, mean within-seed variance) / seeds, so three seeds that happen to agree do not claim more precision
    than their items allow. One seed: the within-seed normal interval."""
    x = np.asarray(estimates, dtype=float)
    k = len(x)
    if k == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    within = float(np.mean(np.square(within_se))) if within_se is not None and len(within_se) else 0.0
    if k == 1:
        half = 1.959964 * math.sqrt(within)
        return (mean, mean - half, mean + half)
    between = float(x.var(ddof=1))
    se = math.sqrt(max(between, within) / k)
    half = t_quantile(k - 1) * se
    return (mean, mean - half, mean + half)


def detectable_drop(n: int, discordance: float, power: float = 0.8, level: float = LEVEL) -> float:
    """Smallest true change (points) a paired comparison of `n` items detects with `power`, when a share
    `discordance` of the items changes (right→wrong or wrong→right): (z_α/2 + z_power) · sqrt(d / n), the normal
    approximation of McNemar's test for a small difference."""
    z = {0.95: 1.959964, 0.9: 1.644854}[level] + {0.8: 0.841621, 0.9: 1.281552}[power]
    return 100 * z * math.sqrt(discordance / n)
