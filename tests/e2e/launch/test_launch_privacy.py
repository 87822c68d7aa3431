"""After real launches, the connector's tables and logs hold no names, patient, appointment,
encounter or practitioner ids, and no conference id: only keyed hashes and sealed values."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from connector_core.domain.models import TenantConfig
from devtools.sandbox import seed
from devtools.sandbox.entra import SENSITIVE_VALUES as ENTRA_SENSITIVE
from tests.e2e.launch.helpers import (
    clinician_launch,
    drop_config,
    forget_mapping,
    own_config,
    patient_launch,
)
from tests.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture
def config(fresh_stack: Stack) -> Iterator[TenantConfig]:
    created = own_config(fresh_stack)
    yield created
    drop_config(fresh_stack, created)


def test_tables_and_logs_hold_no_people_or_clinical_ids(
    fresh_stack: Stack, config: TenantConfig
) -> None:
    s = fresh_stack
    # every kind of launch: first-time clinician (sign-in), patient, group visit + interpreter,
    # a patient waiting for a clinician who has never signed in
    for appointment in ("appt-6b1e0d34", *seed.GROUP_APPOINTMENT_IDS):
        forget_mapping(s, seed.APPOINTMENTS[appointment].practitioner_id)
    forget_mapping(s, seed.INTERPRETER_ID)
    forget_mapping(s, seed.APPOINTMENTS["appt-93af2c6b"].practitioner_id)
    assert clinician_launch(s, s.browser(), config, "appt-6b1e0d34", expect_signin=True).meeting_id
    assert patient_launch(s, s.browser(), config, "appt-6b1e0d34").meeting_id
    group_a, group_b = seed.GROUP_APPOINTMENT_IDS
    assert clinician_launch(s, s.browser(), config, group_a, expect_signin=True).meeting_id
    assert clinician_launch(
        s, s.browser(), config, group_b, practitioner_id=seed.INTERPRETER_ID, expect_signin=True
    ).meeting_id
    assert patient_launch(s, s.browser(), config, group_b).meeting_id
    waiting = patient_launch(s, s.browser(), config, "appt-93af2c6b")
    assert waiting.meeting_id is None and "will start soon" in waiting.response.text

    tables = json.dumps(s.table_dump(), default=str)
    logs = s.logs.text()
    assert "vvamericasvisits" in tables and "launch.completed" in logs  # the scan sees them
    leaks = [
        value
        for value in dict.fromkeys([*seed.SENSITIVE_VALUES, *ENTRA_SENSITIVE])
        if value in tables or value in logs
    ]
    assert leaks == []
