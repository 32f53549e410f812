"""`cnnserve-export all`'s plan: how many at once, in which order, and its run record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from export import family  # noqa: E402
from export.pipeline import ExportRequest  # noqa: E402
from export.registry import get_entry  # noqa: E402


def test_jobs_parse_auto_and_counts() -> None:
    assert family.parse_jobs("auto") is None and family.parse_jobs("3") == 3
    with pytest.raises(ValueError, match="--jobs must be auto or at least 1; got 0"):
        family.parse_jobs("0")


@pytest.mark.parametrize(
    ("requested", "models", "device", "cores", "expected"),
    [
        (None, 11, "cpu", 2, 2),  # auto: one per core
        (None, 1, "cpu", 16, 1),  # never more than the members left
        (None, 11, "cuda", 16, 1),  # one GPU: one at a time
        (4, 11, "cpu", 2, 4),  # asked for: as asked
        (4, 3, "cpu", 2, 3),
    ],
)
def test_choose_jobs(requested, models, device, cores, expected) -> None:
    assert family.choose_jobs(requested, models, device, cores) == expected


def test_planned_seconds_count_the_recipe_steps_or_the_step_limit() -> None:
    epochs = get_entry("vgg").recipe.epochs
    batch = get_entry("vgg").recipe.batch_size
    full = family.planned_seconds(ExportRequest(model="vgg"), 0.5)
    assert full == pytest.approx(epochs * math.ceil(60_000 / batch) * 0.5)
    assert family.planned_seconds(ExportRequest(model="vgg", max_steps=10), 0.5) == 5.0
    small = ExportRequest(model="vgg", train_limit=batch, recipe={"epochs": 2})
    assert family.planned_seconds(small, 0.5) == 1.0


def test_step_seconds_measures_a_real_step_and_nothing_for_fixed_filters() -> None:
    assert family.step_seconds(ExportRequest(model="kirsch"), threads=1) == 0.0
    assert family.step_seconds(ExportRequest(model="lenet5"), threads=1) > 0.0


def test_longest_first_and_when_the_lanes_finish() -> None:
    plan = [
        family.Planned(ExportRequest(model=name), seconds)
        for name, seconds in [("a", 10.0), ("b", 40.0), ("c", 30.0), ("d", 20.0), ("e", 20.0)]
    ]
    ordered = family.longest_first(plan)
    assert [p.request.model for p in ordered] == ["b", "c", "d", "e", "a"]
    # b | c, then d after c (30), e after b (40), a after d (50): done at 60
    assert family.lanes_finish(ordered, 2) == 60.0
    assert family.lanes_finish(ordered, 1) == 120.0
    assert family.describe_plan(ordered, 2, 1) == (
        "training 5 models, 2 at a time on 1 torch thread(s) each, longest first: "
        "about 1 min of training steps (b, c, d, e, a)"
    )


def test_the_plan_measures_each_member_and_puts_the_longest_first() -> None:
    quick = [ExportRequest(model=m, max_steps=5) for m in ("kirsch", "logreg", "lenet5")]
    planned = family.plan(quick, threads=1)
    assert [p.request.model for p in planned] == ["lenet5", "logreg", "kirsch"]
    assert planned[-1].seconds == 0.0 and planned[0].seconds > planned[1].seconds > 0.0


def test_a_run_is_recorded_only_if_it_trained_something(tmp_path: Path) -> None:
    import datetime as dt

    started = dt.datetime(2026, 11, 26, 10, 0, tzinfo=dt.UTC)
    family.record_run(tmp_path, started, 5.0, 2, 1, "cpu", {"cnn": "skipped"})
    assert family.read_runs(tmp_path) == []
    outcomes = {
        "cnn": family.TRAINED,
        "vgg": family.FAILED,
        "mlp": family.SKIPPED,
        "alexnet": family.INT8_FAILED,  # trained in this run: its time counts
    }
    family.record_run(tmp_path, started, 65.25, 2, 1, "cpu", outcomes)
    family.record_run(tmp_path, started, 1.0, 1, 2, "cpu", {"mlp": "trained"})
    runs = family.read_runs(tmp_path)
    assert [r["trained"] for r in runs] == [["alexnet", "cnn"], ["mlp"]]
    assert runs[0] | {"machine": "-"} == {
        "started": "2026-11-26T10:00:00+00:00",
        "seconds": 65.2,
        "jobs": 2,
        "threads": 1,
        "machine": "-",
        "trained": ["alexnet", "cnn"],
        "skipped": ["mlp"],
        "failed": ["alexnet", "vgg"],
    }
    (tmp_path / family.RUNS_FILE).write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="expected a list of runs"):
        family.read_runs(tmp_path)
