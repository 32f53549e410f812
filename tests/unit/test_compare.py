"""bench.serving.compare without load: its options, the alternating order, the medians and
ratios it reports, and the two things a wrong answer would hide behind: each server importing
its own tree's `service`, and the temporary worktree going away even when a run fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.serving import compare


def run(side: str, images_per_s: float, p99: float, cpu_ms: float) -> dict[str, Any]:
    """One side's figures as `run_side` returns them (made up, only their relations matter)."""
    return {
        "side": side,
        "images_per_s": images_per_s,
        "p50": p99 / 2,
        "p99": p99,
        "cpu_ms_per_call": cpu_ms,
        "server_cpu_s_per_1000": cpu_ms,  # one image a call: ms per image = s per 1,000
        "errors": 0,
        "startup_s": 1.5,
    }


def test_defaults_and_server_args() -> None:
    args = compare.build_parser().parse_args(
        ["HEAD~1", "--server-args", '--max-queue-delay-ms 1 --name "a b"', "--rounds", "5"]
    )
    assert (args.rev, args.model, args.system, args.concurrency) == (
        "HEAD~1",
        "lenet5",
        "native",
        32,
    )
    assert (args.images_per_request, args.seconds, args.rounds) == (1, 10.0, 5)
    settings = compare.settings_of(args)
    assert settings["server_args"] == ["--max-queue-delay-ms", "1", "--name", "a b"]
    assert settings["rounds"] == 5
    with pytest.raises(SystemExit):
        compare.build_parser().parse_args(["HEAD", "--system", "triton"])


def test_order_alternates_and_measures_each_side_once_a_round() -> None:
    rounds = compare.order(4)
    assert [r[0] for r in rounds] == ["before", "after", "before", "after"]
    assert all(sorted(r) == ["after", "before"] for r in rounds)
    flat = [side for r in rounds for side in r]
    assert flat[:4] == ["before", "after", "after", "before"]


def test_summary_takes_medians_per_side_and_after_over_before() -> None:
    runs = [
        run("before", 1000, 4.0, 1.0),
        run("after", 1200, 3.0, 0.8),
        run("after", 1100, 3.5, 0.9),
        run("before", 900, 5.0, 1.2),
        run("before", 950, 4.5, 1.1),
        run("after", 1150, 2.5, 0.7),
    ]
    summary = compare.summarise(runs)
    throughput = summary["images_per_s"]
    assert (throughput["before"], throughput["after"]) == (950, 1150)
    assert throughput["ratio"] == round(1150 / 950, 3)
    assert throughput["before_spread_pct"] == round(100 * (1000 - 900) / 950, 1)
    assert summary["cpu_ms_per_call"]["ratio"] == round(0.8 / 1.1, 3)
    assert summary["p99"]["after"] == 3.0

    settings = {"model": "lenet5", "system": "native", "concurrency": 32}
    settings |= {"images_per_request": 1, "rounds": 3, "seconds": 10.0}
    line = compare.one_line("HEAD~1", "abc1234", settings, summary)
    assert line.startswith("bench.serving.compare HEAD~1 (abc1234): lenet5 native c=32 x1 img:")
    assert f"throughput 950 -> 1,150 img/s (x{1150 / 950:.2f})" in line
    assert f"server CPU/call 1.10 -> 0.80 ms (x{0.8 / 1.1:.2f})" in line
    assert line.endswith("3 rounds of 10 s")
    assert "feature map overhead" not in line  # no --feature: no paired figure
    table = compare.summary_table(summary)
    assert "x1.21" in table and "1,150" in table


def test_a_feature_pairs_the_calls_and_its_overhead_joins_the_line() -> None:
    args = compare.build_parser().parse_args(["HEAD", "--feature", "features.layer1"])
    settings = compare.settings_of(args) | {"model": "resnet", "concurrency": 1}
    overheads = {"before": 0.05, "after": 0.04, "before2": 0.06, "after2": 0.03}
    runs = [
        run(side.rstrip("2"), 500, 4.0, 1.0) | {"paired_overhead_ms": value}
        for side, value in overheads.items()
    ]
    summary = compare.summarise(runs)
    assert summary["paired_overhead_ms"] == {
        "before": 0.055,
        "after": 0.035,
        "ratio": round(0.035 / 0.055, 3),
    }
    line = compare.one_line("HEAD", "abc1234", settings, summary)
    assert "resnet native c=1 x1 img ± features.layer1:" in line
    assert "feature map overhead 0.055 -> 0.035 ms" in line


def test_missing_figures_show_as_dashes_not_ratios() -> None:
    runs = [run("before", 0, 1.0, 1.0) | {"cpu_ms_per_call": None}, run("after", 10, 1.0, 1.0)]
    summary = compare.summarise(runs)
    assert summary["cpu_ms_per_call"]["before"] is None
    assert summary["cpu_ms_per_call"]["ratio"] is None
    assert summary["images_per_s"]["ratio"] is None  # nothing to divide by
    assert compare.number(None) == "-"
    assert [compare.number(v) for v in (1234.5, 12.34, 1.234, 0.1234)] == [
        "1,234",
        "12.3",
        "1.23",
        "0.123",
    ]
    assert (compare.number(0.8, 1.1), compare.number(1.1, 0.8)) == ("0.80", "1.10")
    assert "before" in compare.round_table(runs)


def test_a_tree_on_the_path_wins_over_the_editable_install(tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "__init__.py").write_text("")
    assert compare.imported_from(tmp_path) == (tmp_path / "service").resolve()
    assert compare.imported_from(compare.ROOT) == compare.ROOT / "service"


def test_the_worktree_is_removed_when_a_run_fails() -> None:
    if not shutil.which("git") or not (compare.ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    with pytest.raises(RuntimeError), compare.worktree("HEAD") as tree:
        assert (tree / "service" / "cli.py").is_file()
        raise RuntimeError("a failed run")
    assert not tree.parent.exists()
    listed = subprocess.run(
        ["git", "-C", str(compare.ROOT), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(tree) not in listed


def test_importing_it_leaves_our_oip_protos_unloaded() -> None:
    """The spawned load processes import the module; tritonclient cannot load beside them."""
    code = "import sys, bench.serving.compare; print('grpc_service_pb2' in str(list(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=compare.ROOT, capture_output=True)
    assert out.stdout.decode().strip() == "False", out.stderr.decode()


def test_after_args_measure_a_setting_on_the_after_server_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if not shutil.which("git") or not (compare.ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    args = compare.build_parser().parse_args(
        ["HEAD", "--server-args", "--log-level info", "--after-args", "--max-queue-delay-ms 2"]
        + ["--rounds", "2"]
    )
    settings = compare.settings_of(args)
    assert settings["after_args"] == ["--max-queue-delay-ms", "2"]
    started: list[tuple[str, tuple[str, ...]]] = []

    class FakeServer:
        def __init__(self, repository, models, log, extra, cwd, env) -> None:
            started.append((Path(log).stem.split("-")[0], tuple(extra)))

    monkeypatch.setattr(compare, "Server", FakeServer)
    figures = {k: v for k, v in run("x", 1000, 4.0, 1.0).items() if k != "side"}
    monkeypatch.setattr(compare, "run_side", lambda *a: figures)
    data: dict = {"before": {}, "after": {}}
    runs = compare.measure_rounds(args, data, None, None, tmp_path, tmp_path)
    assert runs is not None and len(runs) == 4
    both = ("--log-level", "info")
    assert set(started) == {("before", both), ("after", (*both, "--max-queue-delay-ms", "2"))}
    assert sorted(r["side"] for r in runs) == ["after", "after", "before", "before"]
    summary = compare.summarise(runs)
    line = compare.one_line("HEAD", "abc1234", settings | {"concurrency": 32}, summary)
    assert "lenet5 native c=32 x1 img, after with --max-queue-delay-ms 2:" in line
