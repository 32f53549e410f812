"""The model table's records: what survives a lost model repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export import records


def test_records_round_trip_and_ignore_the_run_record(tmp_path: Path) -> None:
    records.save(tmp_path, {"name": "vgg", "params": 3}, served=True)
    records.save(tmp_path, {"name": "vgg-int8", "params": 3}, served=False)
    records.save_runs(tmp_path, [{"started": "2026-11-26T10:00:00+00:00", "seconds": 1.0}])
    loaded = sorted(records.load(tmp_path), key=lambda record: record[0]["name"])
    assert loaded == [
        ({"name": "vgg", "params": 3}, True),
        ({"name": "vgg-int8", "params": 3}, False),
    ]
    assert records.load_runs(tmp_path)[0]["seconds"] == 1.0
    assert records.load(tmp_path / "absent") == [] and records.load_runs(tmp_path / "x") == []


def test_a_malformed_record_is_named(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"served": True}))
    with pytest.raises(ValueError, match="bad.json"):
        records.load(tmp_path)


def test_runs_merge_once_each_oldest_first() -> None:
    a = {"started": "2026-11-26T10:00:00+00:00", "seconds": 1.0}
    b = {"started": "2026-11-25T10:00:00+00:00", "seconds": 2.0}
    assert records.merge_runs([a], [b, a]) == [b, a]
    assert records.merge_runs([], []) == []


def test_a_run_list_that_is_not_a_list_of_runs_is_named(tmp_path: Path) -> None:
    (tmp_path / records.RUNS).write_text(json.dumps([{"started": "x"}, 3]))
    with pytest.raises(ValueError, match=f"{records.RUNS}: expected a list of runs"):
        records.load_runs(tmp_path)
