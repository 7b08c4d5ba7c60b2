#!/usr/bin/env python3
"""Run the reliability suite (`tests/reliability`) and regenerate `docs/reliability.md` from its results.

Usage (from anywhere; it runs in the repository root with the Python that runs it):

    python scripts/reliability_report.py                      # every test, slow ones included
    python scripts/reliability_report.py -- -k secrets        # extra arguments go to pytest

The tests describe themselves: each module's docstring names its scenario, each test's docstring
says what it checks, and tests record figures (rows, faults injected, retries, kills, ...) in
their `user_properties`, which pytest's JUnit XML carries as `<property>` elements. This script
only runs pytest, reads that XML and writes the table. The exit code is pytest's, so a failing
test fails the script too, after the report has been written.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = "tests/reliability"
DEFAULT_OUTPUT = ROOT / "docs" / "reliability.md"

# The scenarios, in its order: module -> (number, short title).
SCENARIOS = {
    "test_server_faults": (1, "Server faults"),
    "test_server_restart": (2, "Server going away"),
    "test_crash_resume": (3, "Crash (kill -9) and resume"),
    "test_bad_input": (4, "Bad input"),
    "test_bad_responses": (5, "Bad responses"),
    "test_secrets": (6, "Secrets"),
    "test_resource_hygiene": (7, "Resource hygiene"),
}
MAX_MESSAGE = 300  # characters of a failure message or figure kept in the table
# Cleaned out of every cell: pytest's temporary directories (they differ on every run) and the
# suite's recognisable test key (a fake, but this page should not teach scanners to flag it).
_TMP_PATH = re.compile(r"\S*/pytest-of-[^/\s]+/pytest-\d+/[^/\s]+/")
_TEST_KEY = re.compile(r"sk-batchgen-[A-Za-z0-9-]+")


@dataclass
class Case:
    module: str
    name: str  # e.g. test_x[param]
    seconds: float
    outcome: str  # passed / failed / error / skipped
    message: str = ""
    scenario: str = ""
    checks: str = ""
    figures: dict[str, str] = field(default_factory=dict)

    @property
    def function(self) -> str:
        return self.name.split("[", 1)[0]

    @property
    def param(self) -> str | None:
        return self.name[len(self.function) + 1 : -1] if "[" in self.name else None


def run_pytest(junit: Path, extra: list[str]) -> tuple[int, float]:
    command = [sys.executable, "-m", "pytest", SUITE, "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "-o", "junit_logging=no", *extra]
    print("+", " ".join(command), flush=True)
    started = time.monotonic()
    code = subprocess.call(command, cwd=ROOT)
    return code, time.monotonic() - started


def read_junit(path: Path) -> list[Case]:
    cases = []
    for element in ET.parse(path).getroot().iter("testcase"):
        module = element.get("classname", "").rsplit(".", 1)[-1]
        case = Case(module=module, name=element.get("name", ""), seconds=float(element.get("time", "0")),
                    outcome="passed")
        for prop in element.iter("property"):
            name, value = prop.get("name", ""), prop.get("value", "")
            if name == "scenario":
                case.scenario = value
            elif name == "checks":
                case.checks = value
            elif name.startswith("fig:"):
                case.figures[name[4:]] = value
        for kind in ("failure", "error", "skipped"):
            found = element.find(kind)
            if found is not None:
                case.outcome = "failed" if kind == "failure" else kind
                case.message = _first_lines(found.get("message") or found.text or "")
                break
        cases.append(case)
    return cases


def _first_lines(text: str) -> str:
    """The failure's own message: its first lines, without pytest's `assert ...` / `+ where` introspection."""
    kept = []
    for line in (line.strip() for line in text.strip().splitlines()):
        if line.startswith(("assert ", "+ ", "where ")) or len(kept) == 3:
            break
        if line:
            kept.append(line)
    return " ".join(kept)


def _cell(text: str, limit: int = MAX_MESSAGE) -> str:
    text = _TEST_KEY.sub("<test key>", _TMP_PATH.sub("", str(text)))
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _figures(case: Case) -> str:
    return "; ".join(f"{name}: {_cell(value, 160)}" for name, value in case.figures.items())


RESULT = {"passed": "✅ pass", "failed": "❌ FAIL", "error": "❌ ERROR", "skipped": "⏭ skipped"}


def render(cases: list[Case], exit_code: int, seconds: float, extra: list[str]) -> str:
    by_module: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        by_module[case.module].append(case)
    order = sorted(by_module, key=lambda m: SCENARIOS.get(m, (99, m)))
    passed = sum(c.outcome == "passed" for c in cases)
    failed = [c for c in cases if c.outcome in ("failed", "error")]
    lines = [
        "# Reliability report",
        "",
        "<!-- Generated by scripts/reliability_report.py; edit the tests or the script, not this file. -->",
        "",
        "What issue 5 asks batchgen to prove (no row lost or duplicated under server faults, crashes and bad",
        "input; no key leaked), each point an automated, time-bounded test in `tests/reliability/`.",
        "Regenerate this page with:",
        "",
        "```bash",
        "python scripts/reliability_report.py            # runs the suite (2-3 min on 2 cores), rewrites this file",
        "python -m pytest tests/reliability -q           # the same tests, without the report",
        "```",
        "",
        f"Last run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · Python {platform.python_version()} on "
        f"{platform.system()} ({os.cpu_count()} CPUs) · {seconds:.0f} s · **{passed} passed, {len(failed)} failed**"
        + (f" · pytest arguments: `{' '.join(extra)}`" if extra else "")
        + f" · pytest exit code {exit_code}",
        "",
        "| # | Scenario | Tests | Passed | Failed |",
        "|---|---|---|---|---|",
    ]
    for module in order:
        number, title = SCENARIOS.get(module, ("–", module))
        group = by_module[module]
        bad = sum(c.outcome in ("failed", "error") for c in group)
        lines.append(f"| {number} | [{title}](#{_anchor(number, title)}) | {len(group)} | {len(group) - bad} | {bad} |")
    for module in order:
        number, title = SCENARIOS.get(module, ("–", module))
        group = by_module[module]
        scenario = group[0].scenario.split(": ", 1)[-1]
        lines += ["", f"## {number}. {title}", "", _cell(scenario[:1].upper() + scenario[1:], 1000), "",
                  f"Source: `tests/reliability/{module}.py`", "",
                  "| Test | What it checks | Result | What it showed |", "|---|---|---|---|"]
        described: set[str] = set()
        for case in group:
            if case.function in described:
                checks = f"same as above, case `{case.param}`"
            else:
                described.add(case.function)
                checks = _cell(case.checks, 1200)
            shown = _figures(case)
            if case.message:
                shown = (shown + "<br>" if shown else "") + f"**{_cell(case.message)}**"
            lines.append(f"| `{case.name}` | {checks} | {RESULT.get(case.outcome, case.outcome)} ({case.seconds:.1f} s) "
                         f"| {shown or '–'} |")
    if failed:
        lines += ["", "## Failing tests", "",
                  "Each is a correct test of behaviour the issue requires; the failure message is batchgen's current",
                  "behaviour.", ""]
        lines += [f"- `{c.module}.py::{c.name}`: {_cell(c.message, 500)}" for c in failed]
    return "\n".join(lines) + "\n"


def _anchor(number: object, title: str) -> str:
    text = f"{number} {title}".lower()
    return "".join(ch for ch in text.replace(" ", "-") if ch.isalnum() or ch == "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: docs/reliability.md")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (put them after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        junit = Path(tmp) / "junit.xml"
        code, seconds = run_pytest(junit, args.pytest_args)
        if not junit.exists():
            print(f"pytest wrote no results (exit code {code}); {args.output} left as it was", file=sys.stderr)
            return code or 1
        cases = read_junit(junit)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(cases, code, seconds, args.pytest_args))
    failed = sum(c.outcome in ("failed", "error") for c in cases)
    print(f"wrote {args.output}: {len(cases) - failed} passed, {failed} failed", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
