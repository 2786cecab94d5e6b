import numpy as np
import pytest

from lorita.scores import TASKS, score_of, task_of_config


def test_accuracy_is_a_percentage_and_r2_a_plain_number():
    acc, r2 = score_of("classification"), score_of("regression")
    assert acc.text(0.93125) == "93.12 %" and acc.text(np.float32(0.5), 1, sep="") == "50.0%"
    assert r2.text(0.64169) == "0.6417" and r2.text(-1e-6) == "0.0000"  # never "-0.0000"
    for s in (acc, r2):
        assert s.text(None) == s.text(float("nan")) == s.text(True) == "-"
    assert acc.change(0.61, 0.64) == "-3.00 points" and r2.change(0.61, 0.64) == "-0.0300"
    assert acc.name == "accuracy" and r2.name == "R²" and r2.short == "R²"
    assert "0.01" in r2.point_words and "percentage" in acc.point_words


def test_the_task_comes_from_the_dataset_options_and_defaults_to_classification():
    assert TASKS == ("classification", "regression")
    assert task_of_config({"dataset": "lowrank", "dataset_kwargs": {"task": "regression"}}) == (
        "regression"
    )
    for cfg in ({}, None, {"dataset_kwargs": None}, {"dataset_kwargs": {"task": "other"}}):
        assert task_of_config(cfg) == "classification"
    assert score_of(None) is score_of("?") is score_of("classification")


def test_a_score_as_a_table_number_is_what_its_text_writes():
    acc, r2 = score_of("classification"), score_of("regression")
    assert acc.number(0.93124) == pytest.approx(93.124) and acc.number(0.93124, 2) == 93.12
    assert r2.number(-0.25) == -0.25 and r2.number(0.641749, 4) == 0.6417
    assert acc.number(None) is None and r2.number(None) is None
