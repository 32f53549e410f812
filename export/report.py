"""docs/MODELS.md: the model table, rebuilt from the repository's metadata and measured here.

Everything in it comes from a model's `model.json` (what training and validation measured) or
is measured by this command on this machine (ONNX Runtime speed), so the table is regenerated,
never edited. int8 variants that `make models` did not keep (slower or less accurate than
float32) sit in the repository's hidden `.rejected` folder, which the service never loads;
the report still lists them, so the reason they are missing is on record.
"""

from __future__ import annotations

import datetime as dt
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export import family, plots, quantize, records, repository, speed
from export.data import load_fashion_mnist
from export.machine import cpu_model
from export.registry import get_entry, list_models

FIGURES = "models"  # the PNGs' folder, beside MODELS.md
RECORDS = "records"  # every row's model.json, inside FIGURES (export/records.py says why)


@dataclass
class Row:
    """One model version with what this run measured about it."""

    config: dict[str, Any]
    path: Path | None  # None: known from its record only, not in this repository
    served: bool
    speed: speed.Speed | None = None

    @property
    def name(self) -> str:
        return str(self.config["name"])

    @property
    def accuracy(self) -> float | None:
        return self.config["accuracy"]["onnxruntime"]


def _family_order(name: str) -> tuple[int, str]:
    family = list_models()
    base = name.removesuffix(quantize.SUFFIX)
    return (family.index(base) if base in family else len(family), name)


def collect(root: Path) -> list[Row]:
    """The newest version of every model, served ones and rejected int8 ones, in family order."""
    rows = []
    for folder, served in ((root, True), (root / repository.REJECTED, False)):
        newest: dict[str, dict[str, Any]] = {}
        for config in repository.read_configs(folder):
            newest[config["name"]] = config
        for name, config in newest.items():
            path = folder / name / str(config["version"]) / repository.MODEL_FILE
            rows.append(Row(config=config, path=path, served=served))
    return sorted(rows, key=lambda row: _family_order(row.name))


def with_records(rows: list[Row], kept: list[tuple[dict[str, Any], bool]]) -> list[Row]:
    """The repository's rows, plus a row from its record for each model no longer there."""
    present = {row.name for row in rows}
    missing = [
        Row(config, None, served) for config, served in kept if config["name"] not in present
    ]
    return sorted(rows + missing, key=lambda row: _family_order(row.name))


def goal_of(name: str) -> float | None:
    """The family member's accuracy goal (from the registry); None for unknown names."""
    try:
        return get_entry(name).goal
    except KeyError:
        return None


def measure_all(rows: list[Row], images: np.ndarray, seconds: float) -> None:
    """ONNX Runtime speed of every row, fetching what a classification call fetches."""
    for row in rows:
        if row.path is None:
            continue
        outputs = (
            ["probabilities"]
            if row.config["kind"] == "classifier"
            else list(row.config["default_outputs"])
        )
        row.speed = speed.measure(row.path, outputs, images, seconds=seconds)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


# Issue 6 §4: a family member trained wider on a GPU, served under its own name, has its own goal.
GPU_GOALS = {"resnet": 0.95}


def _on_gpu(config: dict[str, Any]) -> bool:
    return str(config["training"].get("device", "cpu")).startswith("cuda")


def row_goal(row: Row) -> float | None:
    """The registry's goal for a default-named member; the GPU goal for a wider GPU run."""
    model = row.config.get("model", row.name)
    if _on_gpu(row.config) and row.name != model:
        return GPU_GOALS.get(model)
    return goal_of(row.name)


def _goal_cell(row: Row) -> str:
    goal = row_goal(row)
    if goal is None or row.accuracy is None:
        return "-"
    return f"{goal * 100:.1f}% {'met' if row.accuracy >= goal else '**missed**'}"


def _trained(config: dict[str, Any]) -> bool:
    """Trained rather than fixed (kirsch): its recipe says so and it ran epochs."""
    return bool(config.get("recipe", {}).get("trainable", True) and config["training"]["epochs"])


def _train_cell(config: dict[str, Any]) -> str:
    training = config["training"]
    if not _trained(config):
        return "fixed weights"
    where = f" on {training.get('machine', training['device'])}" if _on_gpu(config) else ""
    recorded = training["seconds"]
    if not training.get("history"):  # a record that kept the totals only
        return f"{_minutes(recorded)}, {training['epochs']:g} epochs{where}"
    estimate = _median_epoch_estimate(training)
    # A run slowed by other work or paused reads as slower than its recipe: say both.
    typical = f" ({_minutes(estimate)} at its median epoch)" if recorded > 1.1 * estimate else ""
    return f"{_minutes(recorded)}{typical}, {training['epochs']:g} epochs{where}"


FAMILY_BUDGET_S = 2 * 3600  # issue 6: `make models` trains the whole family in two hours


def _median_epoch_estimate(training: dict[str, Any]) -> float:
    """Epochs x the median epoch's wall time: a run's time without its disturbed epochs.

    The recorded time counts every second of the run, including epochs slowed by other work
    on a shared machine or paused; the median epoch is robust to a few such epochs.
    """
    ends = [record["seconds"] for record in training["history"]]
    durations = sorted(b - a for a, b in zip([0.0, *ends], ends, strict=False))
    return durations[len(durations) // 2] * training["epochs"]


def covering_runs(rows: list[Row], runs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The `cnnserve-export all` runs that trained these rows, or None if one was trained apart.

    A row belongs to the run that names it and during which its model.json was written, so a
    member trained again later with `cnnserve-export train` does not borrow an old run's time.
    """
    used: dict[str, dict[str, Any]] = {}
    for row in rows:
        if "created" not in row.config:
            return None
        created = dt.datetime.fromisoformat(row.config["created"])
        run = next(
            (
                run
                for run in runs
                if row.name in run["trained"]
                and 0
                <= (created - dt.datetime.fromisoformat(run["started"])).total_seconds()
                <= run["seconds"]
            ),
            None,
        )
        if run is None:
            return None
        used[run["started"]] = run
    return sorted(used.values(), key=lambda run: run["started"])


def family_time(rows: list[Row], runs: list[dict[str, Any]]) -> list[str]:
    """The family's training time against the two-hour budget: the recorded wall time of the
    `cnnserve-export all` runs that trained it where there is one, else the per-model sum.

    Only what `make models` trains counts: default-named members trained on the CPU, not a
    bigger variant trained elsewhere under its own name.
    """
    trained = [r for r in rows if r.config["training"].get("history") and _from_make_models(r)]
    if not trained:
        return []
    recorded = sum(r.config["training"]["seconds"] for r in trained)
    estimate = sum(_median_epoch_estimate(r.config["training"]) for r in trained)
    budget = f"the {FAMILY_BUDGET_S / 3600:g}-hour budget for `make models`"
    lines = [
        f"Training time of the {len(trained)} trained members, added up: {_minutes(recorded)} "
        f"as recorded, {_minutes(estimate)} as epochs x each run's median epoch (what the runs "
        "take without their disturbed or paused epochs)."
    ]
    covering = covering_runs(trained, runs)
    if covering is None:
        verdict = "within" if estimate <= FAMILY_BUDGET_S else "**over**"
        lines[0] += (
            f" No `cnnserve-export all` run recorded them all, so that estimate is set against "
            f"{budget}: {verdict}."
        )
    else:
        wall = sum(run["seconds"] for run in covering)
        verdict = "within" if wall <= FAMILY_BUDGET_S else "**over**"
        how = "; ".join(
            f"{run['started'][:16].replace('T', ' ')} UTC, {run['jobs']} at a time on "
            f"{run['threads']} torch thread(s) each, {run['machine']}, {_minutes(run['seconds'])}"
            for run in covering
        )
        lines += [
            "",
            f"**`make models` wall time: {_minutes(wall)}**, from the start of "
            f"`cnnserve-export all` to its end, int8 variants included, as recorded in the "
            f"repository's `{family.RUNS_FILE}` ({how}): {verdict} {budget}.",
        ]
        if any(run["jobs"] > 1 for run in covering):
            lines[-1] += (
                " The training column is each member's time in its lane, beside another "
                "member on the other cores; a member alone on all cores trains faster "
                "(`bench/train_jobs.py` prints each recipe's time alone)."
            )
    return [*lines, ""]


def float_table(rows: list[Row]) -> list[str]:
    header = (
        "| model | params | MFLOPs | training | accuracy PyTorch | accuracy ONNX Runtime | goal "
        "| ONNX file | latency batch 1 (p50 / p90) | throughput batch 256 |"
    )
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        c = row.config
        s = row.speed
        lines.append(
            f"| [{row.name}](#{row.name}) | {c['params']:,} | {c['mflops']:.2f} "
            f"| {_train_cell(c)} | {_percent(c['accuracy']['pytorch'])} "
            f"| {_percent(row.accuracy)} | {_goal_cell(row)} "
            f"| {c['file']['bytes'] / 1e6:.2f} MB "
            f"| {s.latency_ms:.2f} / {s.latency_p90_ms:.2f} ms | {s.throughput:,.0f} img/s |"
            if s
            else f"| {row.name} | {c['params']:,} | {c['mflops']:.2f} | {_train_cell(c)} "
            f"| {_percent(c['accuracy']['pytorch'])} | {_percent(row.accuracy)} "
            f"| {_goal_cell(row)} | {c['file']['bytes'] / 1e6:.2f} MB | - | - |"
        )
    return lines


def int8_table(rows: list[Row], by_name: dict[str, Row]) -> list[str]:
    lines = [
        "| model | accuracy int8 | float32 | drop | argmax agrees with float32 "
        "| latency batch 1 int8 / float32 (speed-up) "
        "| throughput batch 256 int8 / float32 (speed-up) | served |",
        "|" + "---|" * 8,
    ]
    for row in rows:
        base = by_name.get(row.config["quantization"]["base"]["name"])
        quant = row.config["quantization"]
        drop = quant["accuracy_drop"]
        if row.speed and base and base.speed:
            latency = (
                f"{row.speed.latency_ms:.2f} / {base.speed.latency_ms:.2f} ms "
                f"(x{base.speed.latency_ms / row.speed.latency_ms:.2f})"
            )
            throughput = (
                f"{row.speed.throughput:,.0f} / {base.speed.throughput:,.0f} img/s "
                f"(x{row.speed.throughput / base.speed.throughput:.2f})"
            )
        else:
            latency = throughput = "-"
        served = "yes" if row.served else "no: " + ", ".join(_reasons(row))
        lines.append(
            f"| {row.name} | {_percent(row.accuracy)} | {_percent(quant['base']['accuracy'])} "
            f"| {drop * 100:.2f} points | {_percent(quant.get('argmax_agreement'))} "
            f"| {latency} | {throughput} | {served} |"
        )
    return lines


def _reasons(row: Row) -> list[str]:
    """Why `make models` did not serve an int8 variant, with the speed-ups it measured then."""
    selection = row.config.get("selection", {})
    reasons = list(selection.get("reasons", [])) or ["not selected"]
    if "int8" in selection and "float32" in selection:
        int8, float32 = selection["int8"], selection["float32"]
        reasons.append(
            f"measured then: x{float32['latency_ms'] / int8['latency_ms']:.2f} at batch 1, "
            f"x{int8['throughput'] / float32['throughput']:.2f} at batch 256"
        )
    return reasons


def bigger_option(name: str) -> str | None:
    """`KEY=VALUE` that doubles a trained member's width (or its first numeric option), or None.

    Width first: a depth option takes only the depths its layout table lists (vgg's 11-19).
    """
    entry = get_entry(name)
    if not entry.recipe.trainable:
        return None  # kirsch: fixed filters, its options are padding and stride, not size
    parameters = inspect.signature(entry.factory).parameters.values()
    sizes = [p for p in parameters if type(p.default) in (int, float)]
    sizes.sort(key=lambda p: p.name != "width")
    if not sizes:
        return None
    return f"{sizes[0].name}={sizes[0].default * 2:g}"


def options_table() -> list[str]:
    """Each trainable member's size options with their defaults, for bigger machines."""
    lines = ["| model | options (defaults) | a bigger one |", "|---|---|---|"]
    for name in list_models():
        entry = get_entry(name)
        if not entry.recipe.trainable:
            continue
        parameters = list(inspect.signature(entry.factory).parameters.values())
        options = ", ".join(f"`{p.name}={p.default!r}`" for p in parameters) or "none"
        bigger = bigger_option(name)
        command = (
            f"`cnnserve-export train --model {name} --name {name}-big --option {bigger}`"
            if bigger
            else "- (fixed layout)"
        )
        lines.append(f"| {name} | {options} | {command} |")
    return lines


def _from_make_models(row: Row) -> bool:
    """Default-named (an int8 variant: its float's name) and trained on the CPU, as `make
    models` trains; not a bigger variant trained elsewhere under its own name."""
    name = row.name.removesuffix(quantize.SUFFIX)
    return not _on_gpu(row.config) and row.config.get("model", name) == name


def _json(value: Any) -> str:
    """Options compared as JSON: a tuple default and a list from model.json are the same."""
    return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))


def changed_options(config: dict[str, Any]) -> dict[str, Any]:
    """The row's model options that differ from its member's defaults."""
    defaults = inspect.signature(get_entry(config.get("model", config["name"])).factory).parameters
    return {
        key: value
        for key, value in config.get("options", {}).items()
        if key not in defaults or _json(value) != _json(defaults[key].default)
    }


def train_command(config: dict[str, Any]) -> str:
    """The `cnnserve-export train` command that trains this row again, from its metadata."""
    model = config["model"]
    words = ["cnnserve-export train", f"--model {model}"]
    if config["name"] != model:
        words.append(f"--name {config['name']}")
    words += [f"--option {key}={_json(value)}" for key, value in changed_options(config).items()]
    if config["recipe"]["epochs"] != get_entry(model).recipe.epochs:
        words.append(f"--epochs {config['recipe']['epochs']}")
    device = config["training"].get("device", "cpu")
    if device != "cpu":
        words.append(f"--device {device}")
    return " ".join(words)


def earlier_recipe(config: dict[str, Any]) -> list[str]:
    """How a member `make models` trained differs from what its default would train today."""
    model = config.get("model", config["name"])
    default = get_entry(model).recipe.to_dict()
    changes = [
        f"{key} {config['recipe'].get(key)!r}, now {value!r}"
        for key, value in default.items()
        if config["recipe"].get(key) != value
    ]
    defaults = inspect.signature(get_entry(model).factory).parameters
    changes += [
        f"{key} {_json(value)}, now {_json(defaults[key].default) if key in defaults else 'gone'}"
        for key, value in changed_options(config).items()
    ]
    return changes


def _stale(rows: list[Row]) -> list[str]:
    """Members trained by an earlier default recipe: the table must not pass them off as today's."""
    lines = [
        f"`{row.name}` ({'; '.join(changes)})"
        for row in rows
        if _from_make_models(row) and _trained(row.config)
        for changes in [earlier_recipe(row.config)]
        if changes
    ]
    if not lines:
        return []
    return [
        "Trained by an earlier default recipe than today's, so `make models` would now train "
        "them differently (remove them from the repository and run it again): "
        + ", ".join(lines)
        + ".",
        "",
    ]


def _apart(rows: list[Row]) -> list[str]:
    """How each model that `make models` does not train was trained, so it can be again."""
    lines = [
        f"- `{row.name}`: `{train_command(row.config)}`"
        for row in rows
        if _trained(row.config) and not _from_make_models(row)
    ]
    return (
        ["Trained apart from `make models`, each with its own command:", "", *lines, ""]
        if lines
        else []
    )


def _recorded(rows: list[Row]) -> list[str]:
    """Rows shown from their records: say so, and why their speed columns are empty."""
    names = [f"`{row.name}`" for row in rows if row.path is None]
    if not names:
        return []
    return [
        f"Not in this repository, shown from their records in `docs/{FIGURES}/{RECORDS}/` (so "
        f"not measured on this machine): {', '.join(names)}.",
        "",
    ]


def _missing(rows: list[Row]) -> list[str]:
    """Family members the repository does not hold yet: the table must not hide them."""
    missing = [name for name in list_models() if name not in {row.name for row in rows}]
    if not missing:
        return []
    shown = ", ".join(f"`{name}`" for name in missing)
    return [f"Not in this repository yet: {shown} (`make models` trains them).", ""]


def render(
    rows: list[Row],
    command: str,
    images: int,
    seconds: float,
    runs: list[dict[str, Any]] | None = None,
    curves: set[str] | None = None,
) -> str:
    """MODELS.md's text; `curves` names the rows whose learning-curve picture exists."""
    runs = runs or []
    curves = (
        {r.name for r in rows if r.config["training"].get("history")} if curves is None else curves
    )
    floats = [r for r in rows if "quantization" not in r.config]
    int8s = [r for r in rows if "quantization" in r.config]
    by_name = {r.name: r for r in floats}
    threads = next((r.speed.threads for r in rows if r.speed), None)
    trained_on = sorted({r.config["training"].get("machine", "not recorded") for r in floats})
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# The model family: accuracy against cost",
        "",
        f"Generated by `{command}` on {when}: do not edit by hand, run it again. The figures "
        "come from each model's `model.json` (written by the export that trained and validated "
        "it) except the speed columns, which this command measured with ONNX Runtime "
        f"{ort.__version__} on **{cpu_model()}**, {threads} intra-op threads, fetching "
        f"`probabilities` for {images} Fashion-MNIST test images (median of runs over "
        f"{seconds:g} s per figure; the machine is shared, so compare figures within this "
        "table, not across machines).",
        "",
        "Trained by `make models` (`cnnserve-export all --skip-existing --quantize auto`): each "
        "model's default recipe (`cnnserve-export models` lists them), seed 0, accuracy on all "
        "10,000 test images. Training machine(s): " + "; ".join(trained_on) + ".",
        "",
        *float_table(floats),
        "",
        *family_time(floats, runs),
        *_recorded(rows),
        *_stale(floats),
        *_missing(floats),
        *_apart(floats),
        f"![accuracy against MFLOPs]({FIGURES}/accuracy-mflops.png)",
        "",
    ]
    if int8s:
        parts += [
            "## int8 variants",
            "",
            "ONNX Runtime static quantization (QDQ), calibrated on training images. A variant is "
            "served (kept in the repository) only where it was at most 1 point less accurate "
            f"and at least {(quantize.MIN_SPEEDUP - 1) * 100:.0f}% faster than float32 at both "
            "batch sizes when `make models` measured it (a smaller difference is inside the "
            "spread of repeated measurements); the others are kept in the "
            f"repository's hidden `{repository.REJECTED}` folder, which the service does not load.",
            "",
            *int8_table(int8s, by_name),
            "",
        ]
    parts += [
        "## Bigger machines",
        "",
        "Every member's size is an option; a bigger model trains with the same command "
        "(add `--device cuda` on a GPU machine) and is served under its own name.",
        "",
        *options_table(),
        "",
        "## Learning curves",
        "",
    ]
    for row in floats:
        if row.name in curves:
            parts += [f"### {row.name}", "", f"![{row.name}]({FIGURES}/curve-{row.name}.png)", ""]
    return "\n".join(parts)


def write_report(
    root: Path,
    docs: Path,
    data_dir: Path | None = None,
    seconds: float = 1.0,
    command: str = "cnnserve-export report",
) -> Path:
    """Measure, draw and write `docs/MODELS.md` with its pictures; returns the file's path.

    Rows of models no longer in the repository come from their records (export/records.py);
    the repository's rows and its run record are written to the records for next time.
    """
    figures = docs / FIGURES
    kept = figures / RECORDS
    present = collect(root)
    if not present:  # records fill in gaps; they do not stand in for a wrong or empty path
        raise ValueError(f"no models in {root}: train some first (make models)")
    rows = with_records(present, records.load(kept))
    runs = records.merge_runs(records.load_runs(kept), family.read_runs(root))
    data = load_fashion_mnist(data_dir)
    images = (data.test_images[: speed.THROUGHPUT_BATCH, None] / 255.0).astype(np.float32)
    measure_all(rows, images, seconds)
    for row in present:
        records.save(kept, row.config, row.served)
    records.save_runs(kept, runs)
    for row in rows:
        if "quantization" not in row.config and row.config["training"].get("history"):
            plots.learning_curve(
                {**row.config, "goal": row_goal(row)}, figures / f"curve-{row.name}.png"
            )
    points = [
        {
            "name": r.name,
            "mflops": r.config["mflops"],
            "accuracy": r.accuracy,
            "throughput": r.speed.throughput,
            "quantized": "quantization" in r.config,
            "served": r.served,
            "family": _from_make_models(r),
        }
        for r in rows
        if r.accuracy is not None and r.speed is not None
    ]
    if points:  # none where the repository holds feature extractors only
        plots.accuracy_against_cost(points, figures / "accuracy-mflops.png")
    path = docs / "MODELS.md"
    # A record kept without its history still has the picture drawn when it had one.
    curves = {r.name for r in rows if (figures / f"curve-{r.name}.png").exists()}
    path.write_text(render(rows, command, len(images), seconds, runs, curves) + "\n")
    return path
