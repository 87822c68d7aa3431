"""NCRONTAB schedules, route templates and settings loading (no servers)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from devtools._ncrontab import (
    CronSchedule,
    IntervalSchedule,
    parse_schedule,
    parse_timespan,
)
from devtools._routes import RouteTemplate, split_path
from devtools.host import HostConfig, load_local_settings

UTC = dt.UTC


def at(*parts: int) -> dt.datetime:
    return dt.datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/1 * * * * *", at(2024, 5, 1, 12, 0, 0), at(2024, 5, 1, 12, 0, 1)),
        ("0 */5 * * * *", at(2024, 5, 1, 12, 3, 10), at(2024, 5, 1, 12, 5, 0)),
        ("0 */5 * * * *", at(2024, 5, 1, 12, 5, 0), at(2024, 5, 1, 12, 10, 0)),
        ("0 0 * * * *", at(2024, 12, 31, 23, 30, 0), at(2025, 1, 1, 0, 0, 0)),
        # 2024-05-04 is a Saturday: next weekday 09:30 is Monday the 6th.
        ("0 30 9 * * 1-5", at(2024, 5, 4, 10, 0, 0), at(2024, 5, 6, 9, 30, 0)),
        ("0 30 9 * * MON-FRI", at(2024, 5, 4, 10, 0, 0), at(2024, 5, 6, 9, 30, 0)),
        ("0 0,30 * * * *", at(2024, 5, 1, 12, 10, 0), at(2024, 5, 1, 12, 30, 0)),
        ("5/15 * * * * *", at(2024, 5, 1, 12, 0, 21), at(2024, 5, 1, 12, 0, 35)),
        ("0 0 12 * JAN,JUL *", at(2024, 2, 1, 0, 0, 0), at(2024, 7, 1, 12, 0, 0)),
        ("0 0 0 29 2 *", at(2025, 3, 1, 0, 0, 0), at(2028, 2, 29, 0, 0, 0)),
        ("0 0 0 1 1 *", at(2024, 5, 1, 0, 0, 0), at(2025, 1, 1, 0, 0, 0)),
        ("10-20/5 * * * * *", at(2024, 5, 1, 12, 0, 16), at(2024, 5, 1, 12, 0, 20)),
        ("0 0 0 * * 7", at(2024, 5, 1, 0, 0, 0), at(2024, 5, 5, 0, 0, 0)),  # 7 = Sunday
        ("*/10 * * * *", at(2024, 5, 1, 12, 1, 0), at(2024, 5, 1, 12, 10, 0)),  # 5 fields
    ],
)
def test_ncrontab_next_occurrence(
    expression: str, after: dt.datetime, expected: dt.datetime
) -> None:
    assert CronSchedule.parse(expression).next_after(after) == expected


def test_ncrontab_sub_second_start_rounds_up() -> None:
    schedule = CronSchedule.parse("*/1 * * * * *")
    after = at(2024, 5, 1, 12, 0, 0).replace(microsecond=400_000)
    assert schedule.next_after(after) == at(2024, 5, 1, 12, 0, 1)


@pytest.mark.parametrize(
    "expression",
    ["* * * *", "60 * * * * *", "*/0 * * * * *", "a * * * * *", "0 0 0 32 * *", "5-1 * * * * *",
     "0 0 0 * 13 *", "1,,2 * * * * *", "0 0 0 30 2 *"],
)
def test_ncrontab_rejects_invalid(expression: str) -> None:
    with pytest.raises(ValueError):
        CronSchedule.parse(expression).next_after(at(2024, 1, 1, 0, 0, 0))


def test_timespan_schedules() -> None:
    assert parse_timespan("00:00:05") == dt.timedelta(seconds=5)
    assert parse_timespan("1.02:03:04.5") == dt.timedelta(
        days=1, hours=2, minutes=3, seconds=4, milliseconds=500
    )
    schedule = parse_schedule("00:10:00")
    assert isinstance(schedule, IntervalSchedule)
    assert schedule.next_after(at(2024, 1, 1, 0, 0, 0)) == at(2024, 1, 1, 0, 10, 0)
    assert isinstance(parse_schedule("0 */5 * * * *"), CronSchedule)
    with pytest.raises(ValueError):
        parse_schedule("00:00:00")


def match(template: str, path: str) -> dict[str, str] | None:
    return RouteTemplate(template).match(split_path(path))


def test_route_templates() -> None:
    assert match("items/{id:int}", "items/7") == {"id": "7"}
    assert match("items/{id:int}", "items/7x") is None
    assert match("items/{id:int}", "items/99999999999") is None  # beyond int32
    assert match("items/{id:long}", "items/99999999999") == {"id": "99999999999"}
    assert match("Items/{id}", "ITEMS/x/") == {"id": "x"}
    assert match("a/{b?}", "a") == {}
    assert match("a/{b=dflt}", "a") == {"b": "dflt"}
    assert match("a/{*rest}", "a/x/y%2Fz") == {"rest": "x/y/z"}
    assert match("a/{**rest}", "a/x/y") == {"rest": "x/y"}
    assert match("f/{name}.{ext}", "f/report.final.pdf") == {"name": "report.final", "ext": "pdf"}
    assert match("n/{v:range(1,10)}", "n/10") == {"v": "10"}
    assert match("n/{v:range(1,10)}", "n/11") is None
    assert match("n/{v:min(5)}", "n/4") is None
    assert match("s/{v:minlength(3):maxlength(4)}", "s/abcd") == {"v": "abcd"}
    assert match("s/{v:length(2)}", "s/abc") is None
    assert match("r/{v:regex(^[a-z]+\\d$)}", "r/ab1") == {"v": "ab1"}
    assert match("r/{v:regex(^[a-z]+\\d$)}", "r/ab") is None
    assert match("g/{v:guid}", "g/{6f9619ff-8b86-d011-b42d-00cf4fc964ff}") is not None
    assert match("b/{v:bool}", "b/False") == {"v": "False"}
    assert match("", "") == {}


def test_route_precedence_and_errors() -> None:
    literal = RouteTemplate("items/special").precedence
    constrained = RouteTemplate("items/{id:int}").precedence
    plain = RouteTemplate("items/{id}").precedence
    catch_all = RouteTemplate("items/{*rest}").precedence
    assert literal < constrained < plain < catch_all
    with pytest.raises(ValueError):
        RouteTemplate("a/{*rest}/b")
    with pytest.raises(ValueError):
        RouteTemplate("a/{b?}/c")
    with pytest.raises(ValueError):
        RouteTemplate("a/{id:nosuch}")


def test_host_config_defaults_and_overrides() -> None:
    default = HostConfig.from_host_json({})
    assert default.route_prefix == "api"
    assert default.max_request_body == 100 * 1024 * 1024
    assert default.queues.batch_size == 16
    assert default.queues.new_batch_threshold == 8
    assert default.queues.max_dequeue_count == 5
    assert default.queues.visibility_timeout == 0
    assert default.queues.message_encoding == "base64"
    custom = HostConfig.from_host_json(
        {
            "extensions": {
                "http": {"routePrefix": ""},
                "Queues": {"visibilityTimeout": "00:00:30", "maxPollingInterval": 500},
            }
        }
    )
    assert custom.route_prefix == ""
    assert custom.queues.visibility_timeout == 30
    assert custom.queues.max_polling_interval == 0.5


def write(path: Path, values: dict[str, object]) -> Path:
    path.write_text(json.dumps({"IsEncrypted": False, "Values": values}), encoding="utf-8")
    return path


def test_settings_environment_wins_over_file(tmp_path: Path) -> None:
    write(tmp_path / "local.settings.json", {"A": "from-file", "B": "from-file", "N": 3})
    write(tmp_path / "local.settings.sample.json", {"A": "sample", "C": "sample"})
    environ = {"A": "from-env"}
    values = load_local_settings(tmp_path, environ=environ)
    assert values == {"A": "from-file", "B": "from-file", "N": "3"}
    assert environ == {"A": "from-env", "B": "from-file", "N": "3"}


def test_settings_fall_back_to_sample_and_explicit_path(tmp_path: Path) -> None:
    write(tmp_path / "local.settings.sample.json", {"C": "sample"})
    environ: dict[str, str] = {}
    load_local_settings(tmp_path, environ=environ)
    assert environ == {"C": "sample"}
    other = write(tmp_path / "other.json", {"D": "other"})
    environ = {}
    load_local_settings(tmp_path, other, environ=environ)
    assert environ == {"D": "other"}
    with pytest.raises(FileNotFoundError):
        load_local_settings(tmp_path, tmp_path / "missing.json", environ={})
    assert load_local_settings(tmp_path / "empty-dir", environ={}) == {}


def test_settings_default_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTTEST_KEEP", "env")
    monkeypatch.delenv("HOSTTEST_NEW", raising=False)
    write(tmp_path / "local.settings.json", {"HOSTTEST_KEEP": "file", "HOSTTEST_NEW": "file"})
    load_local_settings(tmp_path)
    import os

    assert os.environ["HOSTTEST_KEEP"] == "env"
    assert os.environ["HOSTTEST_NEW"] == "file"
    monkeypatch.delenv("HOSTTEST_NEW")
