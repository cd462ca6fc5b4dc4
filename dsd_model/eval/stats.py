"""Intervals and paired tests for evaluation scores, in numpy: percentile bootstrap intervals of a mean, and a
paired comparison of two contenders over the same (subject, prompt, seed) items (paired bootstrap interval of the
mean difference, two-sided sign-flip permutation p-value)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_SAMPLES = 2000
"""Enough for the 2.5/97.5 percentiles to settle to about a hundredth of the interval width."""


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Comparison:
    difference: float
    """Mean of (contender - baseline) over the paired items."""
    low: float
    high: float
    p_value: float
    n: int


def bootstrap_mean(values, confidence: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Estimate:
    """Mean and percentile-bootstrap interval; with one value the interval is that value."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    means = _resampled_means(values, samples, seed)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(values.mean()), float(low), float(high), int(values.size))


def bootstrap_product(a, b, confidence: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Estimate:
    """mean(a) * mean(b) over paired items (the CP·PF of DreamBench++), resampling the items jointly."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    index = np.random.default_rng(seed).integers(0, a.size, (samples, a.size))
    products = a[index].mean(1) * b[index].mean(1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(products, [tail, 100 - tail])
    return Estimate(float(a.mean() * b.mean()), float(low), float(high), int(a.size))


def paired_comparison(baseline, contender, confidence: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> Comparison:
    """Compare paired scores (same items, same order)."""
    differences = np.asarray(contender, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if differences.size == 0:
        return Comparison(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    interval = bootstrap_mean(differences, confidence, samples, seed)
    signs = np.random.default_rng(seed + 1).choice((-1.0, 1.0), (samples, differences.size))
    flipped = np.abs((signs * differences).mean(1))
    observed = abs(differences.mean())
    p_value = (1 + np.count_nonzero(flipped >= observed - 1e-12)) / (samples + 1)
    return Comparison(interval.mean, interval.low, interval.high, float(p_value), interval.n)


def _resampled_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    index = np.random.default_rng(seed).integers(0, values.size, (samples, values.size))
    return values[index].mean(1)
