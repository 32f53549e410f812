"""The result file of `cnnserve score`: CSV, JSON Lines or Parquet, appended batch by batch.

Each finished batch is appended and flushed, so a run that is killed keeps every row it wrote;
`--resume` reads the rows back (dropping a last line torn by the kill) and the run skips their
ids. Parquet cannot be appended to (its footer is written last), so a Parquet run appends to a
JSON Lines journal beside it (`<output>.partial.jsonl`) and turns that into the Parquet file when
it ends; a killed Parquet run resumes from the journal.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}


class OutputError(ValueError):
    """The output file cannot be written or resumed; the message says why."""


@dataclass(frozen=True)
class Row:
    id: str | int  # the item's index (arrays, IDX) or path (folders, manifests)
    label: str  # the predicted class
    probability: float
    top_k: list[tuple[str, float]]
    true_label: str | None = None


def columns(has_labels: bool) -> list[str]:
    return ["id", "label", "probability", "top_k"] + (["true_label"] if has_labels else [])


def top_k_text(top_k: list[tuple[str, float]]) -> str:
    """CSV's compact form: `Ankle boot:0.9981|Sneaker:0.0012`."""
    return "|".join(f"{label}:{probability:.4f}" for label, probability in top_k)


def _json_row(row: Row, names: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": row.id,
        "label": row.label,
        "probability": round(row.probability, 6),
        "top_k": [{"label": label, "probability": round(p, 6)} for label, p in row.top_k],
    }
    if "true_label" in names:
        record["true_label"] = row.true_label
    return record


def _drop_torn_tail(path: Path) -> None:
    """A kill in the middle of a write leaves a last line without its newline: cut it off."""
    with path.open("rb+") as file:
        data = file.read()
        if data and not data.endswith(b"\n"):
            file.truncate(data.rfind(b"\n") + 1)


class _LineWriter:
    """CSV or JSON Lines, opened for appending; `existing` holds the rows already there."""

    def __init__(self, path: Path, kind: str, names: list[str], resume: bool) -> None:
        self.path, self.kind, self.names = path, kind, names
        self.existing: list[dict[str, Any]] = []
        if resume and path.exists():
            _drop_torn_tail(path)
            self.existing = self._read()
        fresh = not path.exists() or path.stat().st_size == 0
        self.file = path.open("a" if resume else "w", newline="", encoding="utf-8")
        if fresh and kind == "csv":
            csv.writer(self.file).writerow(names)
            self.file.flush()

    def _read(self) -> list[dict[str, Any]]:
        text = self.path.read_text(encoding="utf-8")
        if self.kind == "csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if reader.fieldnames and list(reader.fieldnames) != self.names:
                raise OutputError(
                    f"{self.path}: has columns {', '.join(reader.fieldnames)}, this run writes "
                    f"{', '.join(self.names)}; resume with the same input or choose a new --output"
                )
            return [{**row, "true_label": row.get("true_label") or None} for row in reader]
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise OutputError(f"{self.path}, line {number}: not JSON ({error})") from None
            if list(row) != self.names:
                raise OutputError(
                    f"{self.path}, line {number}: has fields {', '.join(row)}, this run writes "
                    f"{', '.join(self.names)}; resume with the same input or choose a new --output"
                )
            rows.append(row)
        return rows

    def write(self, rows: list[Row]) -> None:
        if self.kind == "csv":
            writer = csv.writer(self.file)
            for row in rows:
                values = [row.id, row.label, f"{row.probability:.6f}", top_k_text(row.top_k)]
                if "true_label" in self.names:
                    values.append(row.true_label or "")
                writer.writerow(values)
        else:
            self.file.writelines(json.dumps(_json_row(row, self.names)) + "\n" for row in rows)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError("writing Parquet needs pyarrow: pip install 'cnnserve[score]'") from None
    return pa, pq


class _ParquetWriter:
    """Appends to a JSON Lines journal; `close` writes the Parquet file from it, atomically."""

    def __init__(self, path: Path, names: list[str], indexed: bool, resume: bool) -> None:
        self.pa, self.pq = _pyarrow()
        self.path, self.names, self.indexed = path, names, indexed
        self.journal = journal_path(path)
        if resume and path.exists() and not self.journal.exists():
            self._journal_from_parquet()
        self.lines = _LineWriter(self.journal, "jsonl", names, resume)
        self.existing = self.lines.existing

    def _schema(self) -> Any:
        pa = self.pa
        fields = [
            ("id", pa.int64() if self.indexed else pa.string()),
            ("label", pa.string()),
            ("probability", pa.float64()),
            ("top_k", pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))),
            ("true_label", pa.string()),
        ]
        return pa.schema([field for field in fields if field[0] in self.names])

    def _journal_from_parquet(self) -> None:
        table = self.pq.read_table(self.path)
        if table.column_names != self.names:
            raise OutputError(
                f"{self.path}: has columns {', '.join(table.column_names)}, this run writes "
                f"{', '.join(self.names)}; resume with the same input or choose a new --output"
            )
        with self.journal.open("w", encoding="utf-8") as file:
            file.writelines(json.dumps(row) + "\n" for row in table.to_pylist())

    def write(self, rows: list[Row]) -> None:
        self.lines.write(rows)

    def close(self) -> None:
        self.lines.close()
        records = [json.loads(line) for line in self.journal.read_text("utf-8").splitlines()]
        table = self.pa.Table.from_pylist(records, schema=self._schema())
        partial = self.path.with_name(self.path.name + ".tmp")
        self.pq.write_table(table, partial)
        os.replace(partial, self.path)
        self.journal.unlink()


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.jsonl")


def output_format(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise OutputError(f"{path}: the output's extension picks its format: {', '.join(FORMATS)}")
    return kind


def open_output(
    path: Path, has_labels: bool, indexed: bool, resume: bool, overwrite: bool
) -> _LineWriter | _ParquetWriter:
    """The writer for `path`; `.existing` lists the rows a resumed file already holds."""
    kind = output_format(path)
    names = columns(has_labels)
    started = [p for p in (path, journal_path(path)) if p.exists()]
    if started and not (resume or overwrite):
        raise OutputError(
            f"{started[0]} exists: pass --resume to continue it or --overwrite to replace it"
        )
    if overwrite and not resume:
        for stale in started:
            stale.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        return _ParquetWriter(path, names, indexed, resume)
    return _LineWriter(path, kind, names, resume)
