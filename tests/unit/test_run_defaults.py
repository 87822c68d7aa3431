"""``make run`` keeps its URLs across runs: fixed sandbox ports (a busy one falls back with a
message) and config ids derived from a seed, the tenant and the profile."""

from __future__ import annotations

import socket

import pytest

from devtools import run


def test_the_sandbox_ports_are_fixed_and_distinct() -> None:
    assert run.DEFAULT_PORTS == {"ehr": 7080, "entra": 7443, "graph": 7090}
    assert 7071 not in run.DEFAULT_PORTS.values()  # the connector's


def test_the_seeded_config_id_comes_back_on_every_run() -> None:
    tid = "3f8d2a6b-5c1e-4b7a-9e2d-7a41c0b8e915"
    first = run.seeded_config_id(run.DEFAULT_CONFIG_SEED, tid, "epic")
    assert first == run.seeded_config_id(run.DEFAULT_CONFIG_SEED, tid, "epic")
    assert len(first) == 32 and int(first, 16) >= 0  # hex, like the portal's ids
    others = {
        run.seeded_config_id(run.DEFAULT_CONFIG_SEED, tid, "default"),
        run.seeded_config_id(run.DEFAULT_CONFIG_SEED, tid, "oracle"),
        run.seeded_config_id("another-seed", tid, "epic"),
        run.seeded_config_id(run.DEFAULT_CONFIG_SEED, "another-tenant", "epic"),
    }
    assert first not in others and len(others) == 4


def test_a_free_port_is_kept_and_a_busy_one_falls_back_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run.choose_port(port, "sandbox EHR", "--ehr-port") == 0
        assert "--ehr-port" in capsys.readouterr().out
    assert run.choose_port(port, "sandbox EHR", "--ehr-port") == port  # free again
    assert run.choose_port(0, "sandbox EHR", "--ehr-port") == 0


def test_ports_and_seed_are_overridable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VV_EHR_PORT", "7180")
    assert run._env_port("VV_EHR_PORT", 7080) == 7180
    monkeypatch.setenv("VV_EHR_PORT", "not-a-port")
    assert run._env_port("VV_EHR_PORT", 7080) == 7080
