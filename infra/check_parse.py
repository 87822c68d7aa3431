"""Strict parse of every Bicep file under a directory (run inside .venv-infra by check.sh).

- ``*.bicep``: parsed with pycep-parser, the parser checkov itself uses for Bicep. checkov only
  reports a file it cannot parse in ``parsing_errors`` and still exits 0; this makes it fatal.
- ``*.bicepparam``: pycep-parser has no grammar for Bicep parameter files (it rejects ``using``),
  so they are parsed here by a small strict parser of the subset this project uses: comments,
  one ``using '<file>.bicep'`` line, and ``param <name> = <value>`` lines where a value is a
  string, integer or boolean literal or ``readEnvironmentVariable('NAME'[, <literal>])``. The
  ``using`` target must exist and parse, and every param must be declared by it.
- ``checkov:skip`` comments: each must name a check id and carry a justification text
  (``//checkov:skip=CKV_X_1:why``); checkov itself accepts bare skips.

Exit status 0 when everything is fine, 1 otherwise; one line per problem on stdout.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
STRING = r"'(?:[^'\\\n]|\\.)*'"
LITERAL = rf"(?:{STRING}|-?\d+|true|false)"
USING_RE = re.compile(rf"^using\s+({STRING})\s*$")
PARAM_RE = re.compile(rf"^param\s+({IDENT})\s*=\s*(.+?)\s*$")
ENV_RE = re.compile(rf"^readEnvironmentVariable\(\s*({STRING})\s*(?:,\s*({LITERAL})\s*)?\)$")
LITERAL_RE = re.compile(rf"^{LITERAL}$")
SKIP_RE = re.compile(r"checkov:skip=")
SKIP_FULL_RE = re.compile(r"checkov:skip=\s*([A-Z][A-Z0-9]*_[A-Z0-9_]*\d)\s*:\s*(\S.{9,})$")


def _strip_comment(line: str) -> str:
    """Remove a // comment that is not inside a string literal."""
    in_str = False
    i = 0
    while i < len(line):
        ch = line[i]
        if in_str:
            if ch == "\\":
                i += 2
                continue
            if ch == "'":
                in_str = False
        elif ch == "'":
            in_str = True
        elif line.startswith("//", i):
            return line[:i]
        i += 1
    return line


def parse_value(text: str) -> dict[str, Any]:
    """A bicepparam value as {'kind': 'literal'|'env', ...}; ValueError if unsupported."""
    if LITERAL_RE.match(text):
        return {"kind": "literal", "value": text}
    m = ENV_RE.match(text)
    if m:
        return {"kind": "env", "name": m.group(1)[1:-1], "default": m.group(2)}
    raise ValueError(f"unsupported parameter value {text!r}")


def parse_bicepparam(path: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(using target, {param name: value}) of a .bicepparam file; ValueError on any syntax error."""
    using: str | None = None
    params: dict[str, dict[str, Any]] = {}
    in_block_comment = False
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if in_block_comment:
            if "*/" in line:
                in_block_comment = False
                line = line.split("*/", 1)[1].strip()
            else:
                continue
        if line.startswith("/*"):
            if "*/" not in line:
                in_block_comment = True
            continue
        line = _strip_comment(line).strip()
        if not line:
            continue
        m = USING_RE.match(line)
        if m:
            if using is not None:
                raise ValueError(f"line {lineno}: second 'using' statement")
            if params:
                raise ValueError(f"line {lineno}: 'using' must come before any param")
            using = m.group(1)[1:-1]
            continue
        m = PARAM_RE.match(line)
        if m:
            name, value = m.group(1), m.group(2)
            if name in params:
                raise ValueError(f"line {lineno}: param {name!r} assigned twice")
            try:
                params[name] = parse_value(value)
            except ValueError as exc:
                raise ValueError(f"line {lineno}: {exc}") from None
            continue
        raise ValueError(f"line {lineno}: cannot parse {raw.strip()!r}")
    if in_block_comment:
        raise ValueError("unterminated /* comment")
    if using is None:
        raise ValueError("no 'using' statement")
    return using, params


def check_skips(path: Path) -> list[str]:
    problems = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if SKIP_RE.search(line) and not SKIP_FULL_RE.search(line.strip()):
            problems.append(
                f"{path}:{lineno}: checkov skip without a check id and a justification "
                f"(write //checkov:skip=CKV_..:<why>): {line.strip()}"
            )
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "infra")
    from pycep import BicepParser  # only in .venv-infra

    parser = BicepParser()
    problems: list[str] = []
    declared: dict[Path, set[str]] = {}
    bicep_files = sorted(p for p in root.rglob("*.bicep") if p.is_file())
    param_files = sorted(p for p in root.rglob("*.bicepparam") if p.is_file())
    if not bicep_files:
        problems.append(f"{root}: no .bicep files found")
    for path in bicep_files:
        try:
            tree = parser.parse(text=path.read_text(encoding="utf-8"))
            declared[path.resolve()] = set((tree or {}).get("parameters", {}) or {})
            print(f"parsed  {path}")
        except Exception as exc:  # pycep raises lark errors and ValueError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(f"{path}: Bicep parse error: {first}")
        problems.extend(check_skips(path))
    for path in param_files:
        try:
            using, params = parse_bicepparam(path)
        except ValueError as exc:
            problems.append(f"{path}: bicepparam parse error: {exc}")
            continue
        target = (path.parent / using).resolve()
        if not target.is_file():
            problems.append(f"{path}: 'using' target {using!r} does not exist")
            continue
        if target not in declared:
            problems.append(f"{path}: 'using' target {using!r} did not parse")
            continue
        for name in params:
            if name not in declared[target]:
                problems.append(f"{path}: param {name!r} is not declared in {using}")
        print(f"parsed  {path} (own bicepparam parser)")
        problems.extend(check_skips(path))
    for problem in problems:
        print(f"ERROR   {problem}")
    print(
        f"parse: {len(bicep_files)} .bicep and {len(param_files)} .bicepparam files, "
        f"{len(problems)} problem(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
