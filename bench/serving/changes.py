"""The report's "Changes, measured one at a time": one row per `bench.serving.compare` JSON.

A performance commit measures its effect with `python -m bench.serving.compare REV --json
bench/results/changes/<date>-<name>.json` (see that folder's README). `load` reads the folder
and asks git for each change's commit subject, and for the commit that reverted it where one
did (a change tried, measured and dropped stays in the table, marked), so `section`, called
from the pure `report.render`, turns the list into markdown without touching git or the disk.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

from bench.reliability.report import table
from bench.serving.compare import number

FOLDER = Path("bench/results/changes")
HEADERS = ["Date", "Change", "Workload", "Images/s before → after", "p50 ms", "p99 ms"]
HEADERS += ["Server CPU ms per call", "Throughput spread before / after", "Rounds × s"]
HEADERS += ["Command"]


def _git(folder: Path, *args: str) -> str | None:
    """git's output in `folder`, stripped; None outside a git checkout or when git fails."""
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def subject(commit: str, folder: Path) -> str | None:
    """The commit's subject line, or None outside a git checkout or for an unknown commit."""
    return _git(folder, "log", "-1", "--format=%s", commit, "--")


def reverted_by(commit: str, folder: Path) -> str | None:
    """The commit in HEAD's history whose message says it reverts `commit` (`git revert`'s
    "This reverts commit <full hash>."), abbreviated; None when the change is still in."""
    full = _git(folder, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if full is None:
        return None
    says = f"This reverts commit {full}"
    found = _git(folder, "log", "--format=%h", "--fixed-strings", "--grep", says, "HEAD", "--")
    return found.splitlines()[-1] if found else None


def load(folder: Path = FOLDER) -> list[dict[str, Any]]:
    """Every compare JSON in `folder`, oldest first, each with its `file`, `subject` and
    `reverted_by` added.

    A missing folder is no change measured yet; a file that is not JSON raises, naming it.
    """
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            change = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a bench.serving.compare JSON file: {error}") from error
        commit = change.get("after", {}).get("commit")
        change |= {"file": path.name, "subject": commit and subject(commit, folder)}
        change["reverted_by"] = commit and reverted_by(commit, folder)
        found.append(change)
    # "%Y-%m-%d %H:%M:%S %Z": the first 19 characters sort as times; the file name breaks ties
    return sorted(found, key=lambda c: (str(c.get("date", ""))[:19], c["file"]))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe in a subject or command would end the cell


def headline(subject: str) -> str:
    """What a commit subject says the change is: its first sentence without asides in
    parentheses. The row's own columns carry the measured figures; a subject also quotes the
    compare line and sometimes figures from elsewhere, which the report must not repeat."""
    kept, depth, group = [], 0, []
    for char in subject.split(". ", 1)[0]:
        if char == "(":
            depth += 1
        if depth:
            group.append(char)
        else:
            kept.append(char)
        if char == ")" and depth:
            depth -= 1
            if not depth:  # a call like submit() stays; an aside (words in parentheses) goes
                kept += [] if " " in "".join(group) else group
                group = []
    kept += group  # an unclosed parenthesis is text, not an aside
    return re.sub(r"\s+([,;:])", r"\1", re.sub(r"\s{2,}", " ", "".join(kept))).strip()


def _change(c: dict[str, Any]) -> str:
    after = c["after"]
    flags = c["settings"].get("after_args")
    if flags:  # a setting measured on one tree, with the flags against without
        return f"`{after['commit']}` with `{shlex.join(flags)}`, against without"
    if after.get("uncommitted_changes"):  # the commit is only where the change started from
        return f"`{after['commit']}` + uncommitted changes"
    subject = c.get("subject")
    named = f"`{after['commit']}` {headline(subject)}" if subject else f"`{after['commit']}`"
    reverted = c.get("reverted_by")
    return f"{named}; **reverted** in `{reverted}`" if reverted else named


def _before_after(figure: dict[str, Any], ratio: bool = True) -> str:
    before, after = figure["before"], figure["after"]
    shown = f"{number(before, after)} → {number(after, before)}"
    return shown + (f" (x{figure['ratio']:.2f})" if ratio and figure["ratio"] is not None else "")


def _spread(figure: dict[str, Any]) -> str:
    sides = (figure.get("before_spread_pct"), figure.get("after_spread_pct"))
    return " / ".join("–" if s is None else f"{s:g}%" for s in sides)


def _row(c: dict[str, Any]) -> list[str]:
    st, s = c["settings"], c["summary"]
    images = st["images_per_request"]
    feature = st.get("feature")
    paired = ""
    if feature and s.get("paired_overhead_ms"):
        overhead = _before_after(s["paired_overhead_ms"], ratio=False)
        paired = f", calls with and without `{feature}` alternating: its overhead {overhead} ms"
    return [
        str(c["date"]),
        _cell(_change(c)),
        f"{st['model']} {st['system']}, concurrency {st['concurrency']}, "
        f"{images} image{'s' if images != 1 else ''} per request{paired}",
        _before_after(s["images_per_s"]),
        _before_after(s["p50"], ratio=False),
        _before_after(s["p99"], ratio=False),
        _before_after(s["cpu_ms_per_call"]),
        _spread(s["images_per_s"]),
        f"{st['rounds']} × {st['seconds']:g} s",
        _cell(f"`{c['command']}`"),
    ]


def section(changes: list[dict[str, Any]]) -> list[str]:
    """The section's markdown lines; one line saying so when nothing was measured yet."""
    lines = ["## Changes, measured one at a time", ""]
    if not changes:
        return lines + [f"No change measured one at a time yet (no JSON in `{FOLDER}/`).", ""]
    return lines + [
        "Each row is one change measured by `bench.serving.compare`: runs of the tree before "
        "and after it, interleaved in alternating order on the same machine with the same "
        "client and models, medians over the rounds; a ratio inside the throughput spread of "
        "either side is noise. A row marked reverted was a change tried and dropped for what "
        "it measured; a row naming flags measured a setting on one tree, with them against "
        f"without. The files are in `{FOLDER}/`.",
        "",
        table(HEADERS, [_row(c) for c in changes]),
        "",
    ]
