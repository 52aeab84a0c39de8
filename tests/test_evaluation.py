"""Evaluation summaries: bootstrap intervals on known data and paired differences to the base."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pgdpo.evaluation import bootstrap_interval, summarise
from pgdpo.scoring.table import TOTAL


def test_bootstrap_constant_values():
    low, high = bootstrap_interval(np.full(20, 0.7), seed=0)
    assert low == pytest.approx(0.7)
    assert high == pytest.approx(0.7)


def test_bootstrap_width_matches_normal_theory():
    # For n draws with standard deviation s, the 95% interval of the mean is about +-1.96 s / sqrt(n).
    values = np.random.default_rng(1).normal(loc=2.0, scale=1.0, size=400)
    low, high = bootstrap_interval(values, seed=0, resamples=4000)
    expected_half_width = 1.96 * values.std() / np.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(expected_half_width, rel=0.1)
    assert low < values.mean() < high


def test_bootstrap_two_values_hand_computed():
    # Resampling [0, 1] twice gives means 0, 0.5 and 1 with probabilities 1/4, 1/2 and 1/4,
    # so the 2.5th and 97.5th percentiles are 0 and 1.
    assert bootstrap_interval(np.array([0.0, 1.0]), seed=3, resamples=2000) == (0.0, 1.0)


def test_bootstrap_seeded():
    values = np.random.default_rng(0).random(50)
    assert bootstrap_interval(values, seed=5) == bootstrap_interval(values, seed=5)
    assert bootstrap_interval(values, seed=5) != bootstrap_interval(values, seed=6)


def test_summarise_paired_delta():
    base = pd.DataFrame({"oracle_alignment": [0.2, 0.4, 0.6, 0.8], TOTAL: [0.1, 0.2, 0.3, 0.4]})
    trained = base + 0.1
    summary = summarise({"base": base, "trained": trained}, seed=0, dimensions=["oracle_alignment"])

    entry = summary["trained"]["oracle_alignment"]
    assert entry["mean"] == pytest.approx(0.6)
    assert entry["delta"] == pytest.approx(0.1)
    # Every paired difference is 0.1, so its interval collapses even though the means' intervals are wide.
    assert entry["delta_ci_low"] == pytest.approx(0.1)
    assert entry["delta_ci_high"] == pytest.approx(0.1)
    assert entry["ci_high"] - entry["ci_low"] > 0.2
    assert "delta" not in summary["base"]["oracle_alignment"]
    assert summary["base"][TOTAL]["mean"] == pytest.approx(0.25)
