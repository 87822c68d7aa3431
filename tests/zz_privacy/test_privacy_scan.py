"""The whole session's privacy scan. pytest collects ``tests/`` in directory order, so this
package (``zz_privacy``) runs after every other test of ``make test``: every table and queue of
the session's Azurite and every log line captured since the stack started must hold none of
the sandbox's names, MRNs, NPIs, resource ids or conference ids (``seed.SENSITIVE_VALUES``)
nor its users' names and clinicians' UPNs (``entra.SENSITIVE_VALUES``).

Run alone it is still meaningful: it first drives a full visit itself (the clinician's first
launch with the Microsoft sign-in, the patient's launch as a browser guest, both joining the
meeting, the write-back reaching the EHR), then scans.
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from devtools.sandbox import seed
from devtools.sandbox.entra import SENSITIVE_VALUES as ENTRA_SENSITIVE
from tests.e2e.launch.helpers import Landing, forget_mapping
from tests.e2e.presence._flow import APPOINTMENT, launch_visit
from tests.stack import Stack

pytestmark = pytest.mark.slow


def _queue_texts(stack: Stack) -> list[str]:
    from azure.storage.queue import QueueServiceClient

    service = QueueServiceClient.from_connection_string(stack.azurite.connection_string)
    texts: list[str] = []
    for queue in service.list_queues():
        client = service.get_queue_client(queue.name)
        for message in client.peek_messages(max_messages=32):
            raw = message.content or ""
            try:
                texts.append(base64.b64decode(raw, validate=True).decode("utf-8", "replace"))
            except ValueError:
                texts.append(raw)
    return texts


def test_no_names_or_ehr_ids_anywhere_after_the_whole_session(fresh_stack: Stack) -> None:
    s = fresh_stack
    # one full visit, so the scan has data even when this test runs alone
    forget_mapping(s, seed.APPOINTMENTS[APPOINTMENT].practitioner_id)
    live = launch_visit(s)  # clinician: EHR launch, Microsoft sign-in, meeting, subscription
    patient = Landing(
        s.browser().get(
            s.sandbox.ehr.launch_url(live.config_id, appointment_id=APPOINTMENT, user="patient")
        )
    )
    assert patient.meeting_id == live.meeting.id and patient.mode == "guest"
    live.join_clinician()
    live.join_patient()
    live.wait_audit_events(2)

    rows = s.table_dump()
    tables = json.dumps(rows, default=str)
    queues = "\n".join(_queue_texts(s))
    logs = s.logs.text()
    # the scan sees real data: visits with their participant and write-back ledger rows,
    # mappings, launch and presence logs
    names = {row["_table"] for row in rows}
    assert {"vvamericasvisits", "vvamericasusermaps"} <= names, names
    visit_rows = {str(r["RowKey"])[:2] for r in rows if r["_table"] == "vvamericasvisits"}
    assert {"p-", "w-"} <= visit_rows, visit_rows
    assert "launch.completed" in logs and "presence." in logs

    sensitive = list(dict.fromkeys([*seed.SENSITIVE_VALUES, *ENTRA_SENSITIVE]))
    assert len(sensitive) > 50
    leaks = [
        (value, where)
        for value in sensitive
        for where, text in (("tables", tables), ("queues", queues), ("logs", logs))
        if value in text or _delimited(value).search(text)
    ]
    assert leaks == []


def _delimited(value: str) -> re.Pattern[str]:
    """``value`` in any letter case, standing as a word or value of its own. Sealed values are
    random base64url, where a six-letter name matches in some letter case with a chance of
    (2/64)^6 per position (about 1e-9, over megabytes of them); exactly as written (checked
    above), (1/64)^6."""
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", re.IGNORECASE)
