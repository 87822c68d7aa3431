"""``Versioned[...]`` classes are made once per process: pydantic caches parametrized models only
weakly, and building one again after a garbage collection cost a visit read about 0.5 ms."""

from __future__ import annotations

import gc
import weakref
from typing import TypeVar

from pydantic import BaseModel

from connector_core.domain.models import EhrUserMapping, Versioned

R = TypeVar("R", bound=BaseModel)


def test_a_parametrized_versioned_class_survives_garbage_collection() -> None:
    made = [
        weakref.ref(Versioned[R]),  # type: ignore[valid-type]  # as a generic repository has it
        weakref.ref(Versioned[EhrUserMapping]),
    ]
    gc.collect()
    # Nothing here holds the classes any more: kept alive, they are not built again.
    assert all(ref() is not None for ref in made)
    assert Versioned[EhrUserMapping] is made[1]()
