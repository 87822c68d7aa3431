"""Keep the whole-session privacy scan last, whatever order paths are given in."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [item for item in items if _HERE in Path(str(item.path)).resolve().parents]
    if last:
        others = [item for item in items if item not in last]
        items[:] = others + last
