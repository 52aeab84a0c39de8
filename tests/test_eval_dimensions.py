"""Tests for the evaluation's omni_total column and the per-dimension plot table."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from pgdpo.evaluation import OMNI_TOTAL, add_omni_total, dimension_plot_table, summarise
from pgdpo.scoring.table import TOTAL


def eval_tables() -> dict[str, pd.DataFrame]:
    base = pd.DataFrame({"temporal_flickering": [0.9, 0.95], "oracle_alignment": [0.0, 1.0], TOTAL: [0.1, 0.2]})
    trained = pd.DataFrame({"temporal_flickering": [1.0, 0.9], "oracle_alignment": [1.0, 0.0], TOTAL: [0.3, 0.4]})
    return {"base": base, "trained": trained}


def test_omni_total_pools_models():
    tables = eval_tables()
    add_omni_total(tables, ["temporal_flickering", "oracle_alignment"], quality_weight=4.0, semantic_weight=1.0)
    # temporal_flickering spans 0.9..1.0 over both models, oracle_alignment 0..1.
    assert tables["base"][OMNI_TOTAL].tolist() == pytest.approx([0.0, (4 * 0.5 + 1) / 5])
    assert tables["trained"][OMNI_TOTAL].tolist() == pytest.approx([1.0, 0.0])


def test_omni_total_missing_group_warns(caplog):
    tables = eval_tables()
    with caplog.at_level(logging.WARNING, logger="pgdpo.evaluation"):
        add_omni_total(tables, ["temporal_flickering"], quality_weight=4.0, semantic_weight=1.0)
    assert "no semantic dimension" in caplog.text
    assert tables["trained"][OMNI_TOTAL].tolist() == pytest.approx([1.0, 0.0])


def test_summary_and_plot_table():
    tables = eval_tables()
    add_omni_total(tables, ["temporal_flickering", "oracle_alignment"], 4.0, 1.0)
    summary = summarise(tables, seed=0, dimensions=["temporal_flickering", "oracle_alignment"])
    assert list(summary["base"]) == ["temporal_flickering", "oracle_alignment", OMNI_TOTAL, TOTAL]

    plot = dimension_plot_table(summary)
    assert plot.columns.tolist() == ["dimension", "base", "trained", "trained_delta"]
    assert plot["dimension"].tolist() == ["temporal_flickering", "oracle_alignment", OMNI_TOTAL, TOTAL]
    row = plot.set_index("dimension").loc["temporal_flickering"]
    assert row["base"] == pytest.approx(0.925)
    assert row["trained"] == pytest.approx(0.95)
    assert row["trained_delta"] == pytest.approx(0.025)
