"""Judge a ``checkov -o json`` report of a Bicep directory (run inside .venv-infra by check.sh).

Fails (exit 1) on:
- any entry in ``parsing_errors`` (checkov itself exits 0 when a file does not parse),
- any failed check,
- a skipped check whose in-template comment has no justification,
- an in-template ``checkov:skip`` comment that skips nothing (stale or misspelt id),
- a report that scanned no resources.
Prints a summary: counts, every skip with its justification, every failure.

usage: check_report.py REPORT.json SCANNED_DIR
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path
from typing import Any

SKIP_RE = re.compile(r"checkov:skip=\s*([A-Za-z_\d-]+)")


def _reports(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        return [data]
    return []


def skip_comments(root: Path) -> set[tuple[str, str]]:
    """(path relative to root with leading '/', check id) of every skip comment in .bicep files."""
    found = set()
    for path in sorted(root.rglob("*.bicep")):
        rel = "/" + path.relative_to(root).as_posix()
        for line in path.read_text(encoding="utf-8").splitlines():
            for m in SKIP_RE.finditer(line):
                for check_id in m.group(1).split(","):
                    found.add((rel, check_id))
    return found


def main(argv: list[str]) -> int:
    report_path, root = Path(argv[1]), Path(argv[2])
    try:
        data = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"ERROR   checkov did not produce a JSON report: {exc}")
        return 1

    problems: list[str] = []
    passed = failed = skipped = resources = 0
    parsing_errors: list[str] = []
    skips_seen: set[tuple[str, str]] = set()
    skip_lines: list[str] = []
    fail_lines: list[str] = []
    reports = _reports(data)
    for report in reports:
        results = report.get("results") or {}
        summary = report.get("summary") or {}
        resources += int(summary.get("resource_count") or 0)
        passed += len(results.get("passed_checks") or [])
        parsing_errors.extend(results.get("parsing_errors") or [])
        if not results.get("parsing_errors") and summary.get("parsing_errors"):
            parsing_errors.append(f"{summary['parsing_errors']} file(s) (names not reported)")
        for check in results.get("failed_checks") or []:
            failed += 1
            line = (check.get("file_line_range") or ["?"])[0]
            fail_lines.append(
                f"FAILED  {check.get('check_id')} {check.get('file_path')}:{line} "
                f"{check.get('resource')}: {check.get('check_name')}"
            )
        for check in results.get("skipped_checks") or []:
            skipped += 1
            comment = ((check.get("check_result") or {}).get("suppress_comment") or "").strip()
            where = f"{check.get('check_id')} {check.get('file_path')} {check.get('resource')}"
            skips_seen.add((str(check.get("file_path")), str(check.get("check_id"))))
            if not comment or comment == "No comment provided" or len(comment) < 10:
                problems.append(f"skip without justification: {where}")
            skip_lines.append(f"SKIPPED {where}\n          why: {comment}")

    if not reports or resources == 0:
        problems.append("checkov scanned no Bicep resources")
    for err in parsing_errors:
        problems.append(f"checkov could not parse {err}")
    unparsed = set()
    for err in parsing_errors:
        with contextlib.suppress(ValueError):
            unparsed.add("/" + Path(err).resolve().relative_to(root.resolve()).as_posix())
    for rel, check_id in sorted(skip_comments(root) - skips_seen):
        if rel in unparsed:
            continue  # already reported as a parsing error
        problems.append(
            f"stale skip: {root}{rel} skips {check_id}, which checkov did not report for it"
        )

    for line in skip_lines:
        print(line)
    for line in fail_lines:
        print(line)
    for problem in problems:
        print(f"ERROR   {problem}")
    print(
        f"checkov: {passed} passed, {failed} failed, {skipped} skipped, "
        f"{len(parsing_errors)} parsing error(s), {resources} resources"
    )
    return 1 if (failed or problems) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
