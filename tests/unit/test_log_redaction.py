"""connector_core.logs.redact / install_redaction: OAuth values, bearer credentials and JWTs never
reach a log handler, whoever logs them (the connector or a library), exceptions included."""

from __future__ import annotations

import logging

import pytest

from connector_core.logs import REDACTED, install_redaction, log_event, redact

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        (
            "GET https://c/api/launch/callback?code=Sp1xAbc&state=AgAAAQ.xyz-_&iss=https%3A%2F%2Fehr",
            ["https://c/api/launch/callback?code=", "&state=", "&iss="],
            ["Sp1xAbc", "AgAAAQ.xyz-_", "https%3A%2F%2Fehr"],
        ),
        (
            "302 to https://ehr/authorize?response_type=code&client_id=vv&launch=L-42x&aud=https://f",
            ["response_type=code", "client_id=vv", "aud=https://f"],
            ["L-42x"],
        ),
        ("Authorization: Bearer abc.def-ghi", ["Authorization: Bearer "], ["abc.def-ghi"]),
        (f"token {JWT} end", ["token ", " end"], [JWT]),
        (
            "form: client_assertion=zzz&code_verifier=vvv",
            ["client_assertion=", "code_verifier="],
            ["zzz", "vvv"],
        ),
        (
            "launch.completed config_id=c1 visit_key=ab12 outcome=meeting correlation_id=x",
            ["config_id=c1 visit_key=ab12 outcome=meeting"],
            [],
        ),
    ],
)
def test_redact_replaces_values_not_names(text: str, kept: list[str], gone: list[str]) -> None:
    cleaned = redact(text)
    for part in kept:
        assert part in cleaned
    for part in gone:
        assert part not in cleaned
    if gone:
        assert REDACTED in cleaned


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_every_record_of_the_process_is_scrubbed_before_handlers_see_it() -> None:
    install_redaction()
    install_redaction()  # idempotent
    keep = _Keep()
    library = logging.getLogger("some.library.http")
    library.addHandler(keep)
    library.setLevel(logging.DEBUG)
    try:
        library.info("GET %s", "https://c/api/ehr-signin/callback?code=SECRETCODE&state=SEALED")
        try:
            raise RuntimeError(f"failed for https://x/cb?code=INEXC and Bearer {JWT}")
        except RuntimeError:
            library.exception("call failed")
        log_event(library, "launch.completed", config_id="c1")
    finally:
        library.removeHandler(keep)
    texts = [logging.Formatter().format(r) for r in keep.records]
    joined = "\n".join(texts)
    for secret in ("SECRETCODE", "SEALED", "INEXC", JWT):
        assert secret not in joined
    assert "callback?code=[redacted]&state=[redacted]" in texts[0]
    assert "RuntimeError" in texts[1] and "Traceback" in texts[1]
    assert "launch.completed config_id=c1" in texts[2]


def test_log_event_fields_stay_but_urls_inside_them_are_scrubbed() -> None:
    """A storage error's ``code=`` field is what an operator needs; a URL's ``code=`` is not."""
    import logging

    from connector_core.logs import install_redaction, log_event

    install_redaction()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("connector.test_fields")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    log_event(logger, "storage.failed", code="EntityTooLarge", status=400)
    log_event(logger, "odd", where="https://x.example/cb?code=s3cret&state=abc")
    assert "code=EntityTooLarge" in seen[0]
    assert "s3cret" not in seen[1] and "abc" not in seen[1]
