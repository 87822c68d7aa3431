"""ASP.NET Core route templates, as the Functions host matches HTTP-trigger routes.

Supported: literal segments (case-insensitive), ``{name}``, constraints ``{name:int}`` (int, long,
bool, guid, alpha, double, float, decimal, datetime, minlength(n), maxlength(n), length(n),
length(a,b), min(n), max(n), range(a,b), regex(expr), required), optional ``{name?}``, defaults
``{name=value}``, catch-all ``{*rest}`` / ``{**rest}``, and complex segments like
``{name}.{ext}``. Matching works on the raw path split at ``/`` with each segment then
percent-decoded, like ASP.NET Core.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote

__all__ = ["RouteTemplate", "split_path"]

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def _is_int(value: str, bounds: tuple[int, int]) -> bool:
    if not re.fullmatch(r"[+-]?\d+", value):
        return False
    return bounds[0] <= int(value) <= bounds[1]


def _is_float(value: str) -> bool:
    return re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value) is not None


def _is_guid(value: str) -> bool:
    text = value
    if (text.startswith("{") and text.endswith("}")) or (
        text.startswith("(") and text.endswith(")")
    ):
        text = text[1:-1]
        if len(text) != 36:
            return False
    if len(text) not in (32, 36):
        return False
    if len(text) == 36 and [len(p) for p in text.split("-")] != [8, 4, 4, 4, 12]:
        return False
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _is_datetime(value: str) -> bool:
    try:
        dt.datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _numbers(args: str, count: int, name: str) -> list[int]:
    parts = [p.strip() for p in args.split(",")]
    if len(parts) != count or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise ValueError(f"route constraint {name}({args}) needs {count} integer argument(s)")
    return [int(p) for p in parts]


def _constraint(spec: str) -> Callable[[str], bool]:
    """Build the check for one constraint, e.g. ``int`` or ``range(1,10)``."""
    match = re.fullmatch(r"(?P<name>[A-Za-z]+)(?:\((?P<args>.*)\))?", spec, re.DOTALL)
    if match is None:
        raise ValueError(f"invalid route constraint {spec!r}")
    name, args = match["name"].lower(), match["args"]
    simple: dict[str, Callable[[str], bool]] = {
        "int": lambda v: _is_int(v, _INT32),
        "long": lambda v: _is_int(v, _INT64),
        "bool": lambda v: v.lower() in ("true", "false"),
        "guid": _is_guid,
        "alpha": lambda v: re.fullmatch(r"[A-Za-z]+", v) is not None,
        "double": _is_float,
        "float": _is_float,
        "decimal": _is_float,
        "datetime": _is_datetime,
        "required": lambda v: v != "",
    }
    if name in simple and args is None:
        return simple[name]
    if args is None:
        raise ValueError(f"unknown route constraint {spec!r}")
    if name == "regex":
        pattern = re.compile(args, re.IGNORECASE)
        return lambda v: pattern.search(v) is not None
    if name == "minlength":
        (low,) = _numbers(args, 1, name)
        return lambda v: len(v) >= low
    if name == "maxlength":
        (high,) = _numbers(args, 1, name)
        return lambda v: len(v) <= high
    if name == "length":
        if "," in args:
            low, high = _numbers(args, 2, name)
            return lambda v: low <= len(v) <= high
        (exact,) = _numbers(args, 1, name)
        return lambda v: len(v) == exact
    if name == "min":
        (low,) = _numbers(args, 1, name)
        return lambda v: _is_int(v, _INT64) and int(v) >= low
    if name == "max":
        (high,) = _numbers(args, 1, name)
        return lambda v: _is_int(v, _INT64) and int(v) <= high
    if name == "range":
        low, high = _numbers(args, 2, name)
        return lambda v: _is_int(v, _INT64) and low <= int(v) <= high
    raise ValueError(f"unknown route constraint {spec!r}")


def _split_constraints(text: str) -> list[str]:
    """Split ``int:min(1):regex(a:b)`` at colons outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == ":" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


@dataclass
class _Param:
    name: str
    optional: bool = False
    catch_all: bool = False
    default: str | None = None
    checks: list[Callable[[str], bool]] = field(default_factory=list)

    def accepts(self, value: str) -> bool:
        return all(check(value) for check in self.checks)


def _parse_param(body: str) -> _Param:
    catch_all = body.startswith("*")
    body = body.lstrip("*")
    default: str | None = None
    # A default value follows '=' (outside constraint parentheses).
    depth = 0
    for i, char in enumerate(body):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "=" and depth == 0:
            body, default = body[:i], body[i + 1 :]
            break
    optional = body.endswith("?")
    if optional:
        body = body[:-1]
    name, *constraints = _split_constraints(body)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"invalid route parameter name {name!r}")
    return _Param(name, optional, catch_all, default, [_constraint(c) for c in constraints])


@dataclass
class _Segment:
    literal: str | None = None  # a plain literal segment
    param: _Param | None = None  # a segment that is exactly one parameter
    # complex segment: regex over the whole segment plus its parameters in order
    regex: re.Pattern[str] | None = None
    params: list[_Param] = field(default_factory=list)

    @property
    def rank(self) -> int:
        """ASP.NET route precedence digit: lower is more specific."""
        if self.literal is not None:
            return 1
        if self.regex is not None:
            return 2
        assert self.param is not None
        if self.param.catch_all or self.param.optional:
            return 5
        return 3 if self.param.checks else 4


_TOKEN = re.compile(r"\{([^{}]*)\}")


def _parse_segment(text: str) -> _Segment:
    tokens = list(_TOKEN.finditer(text))
    if not tokens:
        if "{" in text or "}" in text:
            raise ValueError(f"unbalanced braces in route segment {text!r}")
        return _Segment(literal=text)
    if len(tokens) == 1 and tokens[0].span() == (0, len(text)):
        return _Segment(param=_parse_param(tokens[0].group(1)))
    pattern, pos = "", 0
    params: list[_Param] = []
    for token in tokens:
        pattern += re.escape(text[pos : token.start()])
        param = _parse_param(token.group(1))
        if param.catch_all:
            raise ValueError(f"a catch-all parameter must be a whole segment: {text!r}")
        # ASP.NET matches complex segments right to left, non-greedily: earlier ones get more.
        pattern += f"(?P<p{len(params)}>.+)" + ("?" if param.optional else "")
        params.append(param)
        pos = token.end()
    pattern += re.escape(text[pos:])
    return _Segment(regex=re.compile(pattern, re.IGNORECASE | re.DOTALL), params=params)


def split_path(raw_path: str) -> list[str]:
    """Split a raw (still percent-encoded) path at ``/`` and decode each segment."""
    parts = raw_path.strip("/").split("/")
    return [] if parts == [""] else [unquote(p) for p in parts]


class RouteTemplate:
    """A parsed route template (without the route prefix)."""

    def __init__(self, template: str) -> None:
        self.template = template
        stripped = template.strip().strip("/")
        texts = [] if stripped == "" else stripped.split("/")
        self.segments = [_parse_segment(t) for t in texts]
        for i, seg in enumerate(self.segments):
            if seg.param is not None and seg.param.catch_all and i != len(self.segments) - 1:
                raise ValueError(f"catch-all parameter must be last in route {template!r}")
            if seg.param is not None and seg.param.optional:
                later = self.segments[i + 1 :]
                if any(
                    s.param is None or not (s.param.optional or s.param.catch_all) for s in later
                ):
                    raise ValueError(f"only optional parameters may follow {{{seg.param.name}?}}")

    @property
    def precedence(self) -> tuple[int, ...]:
        return tuple(seg.rank for seg in self.segments)

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        """Route values if the decoded path ``segments`` match, else None."""
        values: dict[str, str] = {}
        for i, seg in enumerate(self.segments):
            if seg.param is not None and seg.param.catch_all:
                rest = "/".join(segments[i:])
                if rest == "":
                    if seg.param.default is not None:
                        values[seg.param.name] = seg.param.default
                    return values
                if not seg.param.accepts(rest):
                    return None
                values[seg.param.name] = rest
                return values
            if i >= len(segments):
                if seg.param is None:
                    return None
                if seg.param.default is not None:
                    values[seg.param.name] = seg.param.default
                elif not seg.param.optional:
                    return None
                continue
            text = segments[i]
            if seg.literal is not None:
                if text.lower() != seg.literal.lower():
                    return None
            elif seg.param is not None:
                if text == "" or not seg.param.accepts(text):
                    return None
                values[seg.param.name] = text
            else:
                assert seg.regex is not None
                found = seg.regex.fullmatch(text)
                if found is None:
                    return None
                for j, param in enumerate(seg.params):
                    value = found.group(f"p{j}")
                    if value is None:
                        if param.default is not None:
                            values[param.name] = param.default
                        continue
                    if not param.accepts(value):
                        return None
                    values[param.name] = value
        if len(segments) > len(self.segments):
            return None
        return values

    def __repr__(self) -> str:
        return f"RouteTemplate({self.template!r})"
