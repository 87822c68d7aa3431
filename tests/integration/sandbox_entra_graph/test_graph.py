"""The Graph/Teams stand-in over real HTTP: meetings, subscriptions with the validation handshake,
meeting call event notifications (encrypted and plain) to a local webhook receiver."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes

from devtools.sandbox import Sandbox
from devtools.sandbox.entra import GRAPH_CHANGE_TRACKING_APP_ID
from devtools.sandbox.graph import RichNotificationError, decrypt_rich_notification
from tests.integration.sandbox_entra_graph.conftest import EncryptionCert, Receiver, ca_context


def _clinician(sandbox: Sandbox, tid: str) -> str:
    return next(u.oid for u in sandbox.entra.users_in(tid) if u.kind == "clinician")


def _meeting_body(external_id: str | None = None) -> dict[str, Any]:
    start = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return {
        "externalId": external_id or f"vk-{uuid.uuid4().hex}",
        "subject": "Virtual visit",
        "startDateTime": start.isoformat().replace("+00:00", "Z"),
        "endDateTime": (start + dt.timedelta(minutes=30)).isoformat().replace("+00:00", "Z"),
        "lobbyBypassSettings": {"scope": "organizer", "isDialInBypassEnabled": False},
        "allowMeetingChat": "limited",
    }


def _create_meeting(client: httpx.Client, organizer: str) -> dict[str, Any]:
    response = client.post(
        f"/v1.0/users/{organizer}/onlineMeetings/createOrGet", json=_meeting_body()
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def _expiry(minutes: int = 60) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)).strftime(
        "%Y-%m-%dT%H:%M:%S.%f0Z"
    )


def _subscribe(
    client: httpx.Client,
    receiver: Receiver,
    meeting: dict[str, Any],
    cert: EncryptionCert | None,
    *,
    lifecycle: bool = True,
    version: str = "beta",
) -> httpx.Response:
    body: dict[str, Any] = {
        "changeType": "updated",
        "notificationUrl": f"{receiver.url}/api/presence",
        "resource": f"communications/onlineMeetings/?$filter=JoinWebUrl eq "
        f"'{meeting['joinWebUrl']}'",
        "expirationDateTime": _expiry(),
        "clientState": secrets.token_urlsafe(32),
        "includeResourceData": cert is not None,
    }
    if lifecycle:
        body["lifecycleNotificationUrl"] = f"{receiver.url}/api/presence/lifecycle"
    if cert is not None:
        body["encryptionCertificate"] = cert.b64_der
        body["encryptionCertificateId"] = "notif-cert-1"
    return client.post(f"/{version}/subscriptions", json=body)


def test_create_or_get_is_idempotent(
    sandbox: Sandbox, contoso_graph: httpx.Client, contoso: str
) -> None:
    organizer = _clinician(sandbox, contoso)
    body = _meeting_body()
    first = contoso_graph.post(f"/v1.0/users/{organizer}/onlineMeetings/createOrGet", json=body)
    assert first.status_code == 201, first.text
    meeting = first.json()
    second = contoso_graph.post(f"/v1.0/users/{organizer}/onlineMeetings/createOrGet", json=body)
    assert second.status_code == 200
    assert second.json()["id"] == meeting["id"]
    assert second.json()["joinWebUrl"] == meeting["joinWebUrl"]
    assert meeting["externalId"] == body["externalId"]
    assert meeting["subject"] == "Virtual visit"
    assert meeting["lobbyBypassSettings"] == {"scope": "organizer", "isDialInBypassEnabled": False}
    assert meeting["allowMeetingChat"] == "limited"
    assert meeting["participants"]["organizer"]["identity"]["user"]["id"] == organizer
    assert meeting["chatInfo"]["threadId"].startswith("19:meeting_")
    assert meeting["joinWebUrl"].startswith(f"{sandbox.graph_url}/l/meetup-join/19%3ameeting_")
    assert "context=%7b%22Tid%22%3a%22" in meeting["joinWebUrl"]
    assert meeting["id"] in sandbox.graph.meetings
    fetched = contoso_graph.get(f"/v1.0/users/{organizer}/onlineMeetings/{meeting['id']}")
    assert fetched.status_code == 200 and fetched.json()["id"] == meeting["id"]


def test_meeting_errors(
    sandbox: Sandbox, contoso_graph: httpx.Client, contoso: str, fabrikam: str
) -> None:
    other_tenant_user = _clinician(sandbox, fabrikam)
    unknown = contoso_graph.post(
        f"/v1.0/users/{other_tenant_user}/onlineMeetings/createOrGet", json=_meeting_body()
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "NotFound"

    organizer = _clinician(sandbox, contoso)
    sandbox.graph.set_access_policy(contoso, False)
    denied = contoso_graph.post(
        f"/v1.0/users/{organizer}/onlineMeetings/createOrGet", json=_meeting_body()
    )
    assert denied.status_code == 403
    error = denied.json()["error"]
    assert error["code"] == "Forbidden"
    assert error["message"] == "No application access policy found for this app."
    assert "request-id" in error["innerError"]
    sandbox.graph.set_access_policy(organizer, True)  # a user grant wins over the tenant's
    assert (
        contoso_graph.post(
            f"/v1.0/users/{organizer}/onlineMeetings/createOrGet", json=_meeting_body()
        ).status_code
        == 201
    )

    portal = sandbox.entra.mint_access_token(tid=contoso, oid=organizer)
    wrong_aud = httpx.post(
        f"{sandbox.graph_url}/v1.0/users/{organizer}/onlineMeetings/createOrGet",
        json=_meeting_body(),
        headers={"Authorization": f"Bearer {portal}"},
    )
    assert wrong_aud.status_code == 401
    assert wrong_aud.json()["error"]["code"] == "InvalidAuthenticationToken"
    missing = httpx.post(
        f"{sandbox.graph_url}/v1.0/users/{organizer}/onlineMeetings/createOrGet",
        json=_meeting_body(),
    )
    assert missing.status_code == 401


def test_throttling_with_retry_after_then_success(
    sandbox: Sandbox, contoso_graph: httpx.Client, contoso: str
) -> None:
    organizer = _clinician(sandbox, contoso)
    sandbox.graph.fail_next("onlineMeetings/createOrGet", status=429, count=1, retry_after=3)
    body = _meeting_body()
    throttled = contoso_graph.post(f"/v1.0/users/{organizer}/onlineMeetings/createOrGet", json=body)
    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "3"
    assert throttled.json()["error"]["code"] == "TooManyRequests"
    ok = contoso_graph.post(f"/v1.0/users/{organizer}/onlineMeetings/createOrGet", json=body)
    assert ok.status_code == 201


def test_subscription_validation_handshake_and_management(
    sandbox: Sandbox,
    contoso_graph: httpx.Client,
    receiver: Receiver,
    contoso: str,
    encryption_cert: EncryptionCert,
) -> None:
    meeting = _create_meeting(contoso_graph, _clinician(sandbox, contoso))
    response = _subscribe(contoso_graph, receiver, meeting, encryption_cert)
    assert response.status_code == 201, response.text
    sub = response.json()
    assert sub["expirationDateTime"].endswith("0Z")
    assert sub["includeResourceData"] is True
    assert sub["encryptionCertificateId"] == "notif-cert-1"
    assert sub["applicationId"] == sandbox.entra.client_id
    # both endpoints were validated; the decoded token (spaces, +, /, =, &, %) arrived intact
    sent = [d.validation_token for d in sandbox.graph.deliveries if d.kind == "validation"]
    assert [p for p, _ in receiver.validation_tokens] == [
        "/api/presence",
        "/api/presence/lifecycle",
    ]
    assert [t for _, t in receiver.validation_tokens] == sent[-2:]
    for token in sent[-2:]:
        assert token is not None and " " in token and "+" in token and "&" in token
    assert all(ct.startswith("text/plain") for ct in receiver.validation_content_types)

    renewed = contoso_graph.patch(
        f"/beta/subscriptions/{sub['id']}", json={"expirationDateTime": _expiry(120)}
    )
    assert renewed.status_code == 200
    assert renewed.json()["expirationDateTime"] > sub["expirationDateTime"]
    too_far = contoso_graph.patch(
        f"/beta/subscriptions/{sub['id']}", json={"expirationDateTime": _expiry(4231 + 5)}
    )
    assert too_far.status_code == 400
    assert "4230 minutes" in too_far.json()["error"]["message"]
    assert contoso_graph.post(f"/beta/subscriptions/{sub['id']}/reauthorize").status_code == 204
    assert sandbox.graph.subscriptions[sub["id"]].reauthorized_at is not None
    assert contoso_graph.delete(f"/beta/subscriptions/{sub['id']}").status_code == 204
    gone = contoso_graph.patch(
        f"/beta/subscriptions/{sub['id']}", json={"expirationDateTime": _expiry()}
    )
    assert gone.status_code == 404


def test_subscription_create_errors(
    sandbox: Sandbox,
    contoso_graph: httpx.Client,
    receiver: Receiver,
    contoso: str,
    encryption_cert: EncryptionCert,
) -> None:
    meeting = _create_meeting(contoso_graph, _clinician(sandbox, contoso))
    receiver.bad_echo = True
    failed = _subscribe(contoso_graph, receiver, meeting, encryption_cert)
    assert failed.status_code == 400
    assert "Subscription validation request failed" in failed.json()["error"]["message"]
    receiver.bad_echo = False
    no_cert = contoso_graph.post(
        "/beta/subscriptions",
        json={
            "changeType": "updated",
            "notificationUrl": f"{receiver.url}/api/presence",
            "resource": f"communications/onlineMeetings/?$filter=JoinWebUrl eq "
            f"'{meeting['joinWebUrl']}'",
            "expirationDateTime": _expiry(),
            "includeResourceData": True,
        },
    )
    assert no_cert.status_code == 400
    unknown = contoso_graph.post(
        "/beta/subscriptions",
        json={
            "changeType": "updated",
            "notificationUrl": f"{receiver.url}/api/presence",
            "resource": "communications/onlineMeetings/?$filter=JoinWebUrl eq "
            f"'{sandbox.graph_url}/l/meetup-join/19%3ameeting_nope%40thread.v2/0'",
            "expirationDateTime": _expiry(),
        },
    )
    assert unknown.status_code == 404
    assert sandbox.graph.subscriptions_for(meeting["id"]) == []


def _events(items: list[dict[str, Any]], cert: EncryptionCert) -> list[dict[str, Any]]:
    return [decrypt_rich_notification(i["encryptedContent"], cert.key) for i in items]


def test_encrypted_call_events_round_trip(
    sandbox: Sandbox,
    contoso_graph: httpx.Client,
    receiver: Receiver,
    contoso: str,
    encryption_cert: EncryptionCert,
) -> None:
    organizer = _clinician(sandbox, contoso)
    meeting = _create_meeting(contoso_graph, organizer)
    sub = _subscribe(contoso_graph, receiver, meeting, encryption_cert).json()
    graph = sandbox.graph
    clinician = graph.join(meeting["id"], "organizer")
    patient = graph.join(meeting["id"], "guest", display_name="Patient Guest")
    assert graph.meetings[meeting["id"]].participants[patient].state == "lobby"
    graph.admit(meeting["id"], patient)
    graph.leave(meeting["id"], patient)
    graph.leave(meeting["id"], clinician)
    items = receiver.wait_items(6, subscription_id=sub["id"])
    body = next(r.body for r in receiver.received if r.path == "/api/presence")
    for item in items:
        assert item["clientState"] == sub["clientState"]
        assert item["changeType"] == "updated"
        assert item["tenantId"] == contoso
        assert item["encryptedContent"]["encryptionCertificateId"] == "notif-cert-1"
        assert item["encryptedContent"]["encryptionCertificateThumbprint"] == (
            encryption_cert.cert.fingerprint(hashes.SHA1()).hex().upper()
        )
        assert meeting["joinWebUrl"] in item["resource"]
    events = _events(items, encryption_cert)
    types = [e["eventType"].rsplit(".", 1)[-1] for e in events]
    assert types == [
        "CallStarted",
        "CallRosterUpdate",
        "CallRosterUpdate",
        "CallRosterUpdate",
        "CallRosterUpdate",
        "CallEnded",
    ]
    assert events[1]["activeParticipants@joined"][0]["identity"]["User"]["Id"] == organizer
    assert events[1]["activeParticipants@joined"][0]["identity"]["User"]["TenantId"] == contoso
    guest = events[2]["activeParticipants@joined"][0]
    assert guest["id"] == patient and "Guest" in guest["identity"]
    assert events[3]["activeParticipants@exited"][0]["id"] == patient
    assert events[4]["activeParticipants@exited"][0]["id"] == clinician
    times = [e["eventDateTime"] for e in events]
    assert times == sorted(times) and len(set(times)) == len(times)
    # validation tokens: issued for our app by Graph's change-tracking app, signed by Entra
    token = body["validationTokens"][0]
    key = next(k for k in sandbox.entra.keys if k.kid == jwt.get_unverified_header(token)["kid"])
    claims = jwt.decode(
        token,
        key.public_key,
        algorithms=["RS256"],
        audience=sandbox.entra.client_id,
        issuer=f"https://sts.windows.net/{contoso}/",
    )
    assert claims["appid"] == GRAPH_CHANGE_TRACKING_APP_ID
    # tampering is detected
    tampered = dict(items[0]["encryptedContent"])
    tampered["dataSignature"] = tampered["dataSignature"][::-1]
    with pytest.raises(RichNotificationError):
        decrypt_rich_notification(tampered, encryption_cert.key)
    graph.wait_idle()
    deliveries = graph.notifications(sub["id"])
    assert all(d.ok and d.latency_ms is not None for d in deliveries)


def test_plain_resource_data_lifecycle_and_delivery_hooks(
    sandbox: Sandbox,
    contoso_graph: httpx.Client,
    receiver: Receiver,
    contoso: str,
) -> None:
    meeting = _create_meeting(contoso_graph, _clinician(sandbox, contoso))
    sub = _subscribe(contoso_graph, receiver, meeting, None, version="v1.0").json()
    graph = sandbox.graph
    receiver.fail_next = 1  # Graph retries a failed delivery
    clinician = graph.join(meeting["id"], "organizer")
    items = receiver.wait_items(2, subscription_id=sub["id"])
    assert "encryptedContent" not in items[0]
    assert items[0]["resourceData"]["eventType"] == "Microsoft.Communication.CallStarted"
    assert items[1]["resourceData"]["activeParticipants@joined"][0]["id"] == clinician
    graph.wait_idle()
    assert graph.notifications(sub["id"])[0].attempts == 2

    graph.duplicate_next()
    staff = graph.join(meeting["id"], "staff")  # same tenant staff: lobby (scope organizer)
    graph.admit(meeting["id"], staff)
    items = receiver.wait_items(4, subscription_id=sub["id"])
    assert items[2] == items[3]  # delivered twice

    graph.reorder_next()
    graph.leave(meeting["id"], staff)
    graph.leave(meeting["id"], clinician)
    items = receiver.wait_items(7, subscription_id=sub["id"])
    last = [i["resourceData"] for i in items[4:]]
    assert last[0]["activeParticipants@exited"][0]["id"] == clinician  # swapped
    assert last[1]["activeParticipants@exited"][0]["id"] == staff
    assert last[0]["eventDateTime"] > last[1]["eventDateTime"]

    graph.send_lifecycle(sub["id"], "reauthorizationRequired")
    graph.send_lifecycle(sub["id"], "subscriptionRemoved")
    lifecycle = receiver.wait_items(2, path="/api/presence/lifecycle")
    assert [i["lifecycleEvent"] for i in lifecycle] == [
        "reauthorizationRequired",
        "subscriptionRemoved",
    ]
    assert lifecycle[0]["clientState"] == sub["clientState"]
    graph.send_raw(sub["id"], {"value": [{"subscriptionId": sub["id"], "clientState": "forged"}]})
    graph.wait_idle()
    assert receiver.items()[-1]["clientState"] == "forged"
    before = len(receiver.items())
    graph.join(meeting["id"], "organizer")  # removed subscription: no more notifications
    graph.wait_idle()
    assert len(receiver.items()) == before


def test_meeting_page_guest_lobby_admit_leave(
    sandbox: Sandbox, contoso_graph: httpx.Client, contoso: str
) -> None:
    meeting = _create_meeting(contoso_graph, _clinician(sandbox, contoso))
    with httpx.Client(timeout=10) as browser:
        guest_page = browser.get(meeting["joinWebUrl"] + "&anon=true")
        assert guest_page.status_code == 200
        assert 'class="join-guest"' in guest_page.text
        assert 'class="join-organizer"' not in guest_page.text
        action = re.search(
            r'<form class="join-guest" method="post" action="([^"]+)"', guest_page.text
        )
        assert action is not None
        joined = browser.post(
            action.group(1).replace("&amp;", "&"),
            data={"role": "guest", "displayName": "Pat Guest"},
        )
        assert joined.status_code == 303
        lobby_url = joined.headers["location"]
        guest_id = parse_qs(urlsplit(lobby_url).query)["participant"][0]
        lobby = browser.get(lobby_url)
        assert 'data-state="lobby"' in lobby.text
        assert 'http-equiv="refresh"' in lobby.text

        full = browser.get(meeting["joinWebUrl"])
        assert 'class="join-organizer"' in full.text and 'class="join-staff"' in full.text
        org = browser.post(action.group(1).replace("&amp;", "&"), data={"role": "organizer"})
        organizer_url = org.headers["location"]
        organizer_page = browser.get(organizer_url)
        assert 'data-state="in_meeting"' in organizer_page.text
        assert f'<button type="submit" class="admit" data-participant-id="{guest_id}"' in (
            organizer_page.text
        )
        organizer_id = parse_qs(urlsplit(organizer_url).query)["participant"][0]
        base = f"{sandbox.graph_url}/sandbox/meetings/{meeting['id']}"
        browser.post(f"{base}/admit", data={"by": organizer_id, "participant": guest_id})
        assert 'data-state="in_meeting"' in browser.get(lobby_url).text
        browser.post(f"{base}/leave", data={"participant": guest_id})
        assert 'data-state="left"' in browser.get(lobby_url).text
    state = sandbox.graph.meetings[meeting["id"]]
    assert state.participants[guest_id].state == "left"
    assert state.call_active  # the organizer is still in


def test_graph_token_from_https_token_endpoint_has_expected_claims(
    sandbox: Sandbox, contoso: str
) -> None:
    response = httpx.post(
        sandbox.entra.token_endpoint(contoso),
        data={
            "grant_type": "client_credentials",
            "client_id": sandbox.entra.client_id,
            "client_secret": sandbox.entra.client_secret,
            "scope": "https://graph.microsoft.com/.default",
        },
        verify=ca_context(sandbox),
    )
    claims = sandbox.entra.verify_token(
        response.json()["access_token"], audience="https://graph.microsoft.com"
    )
    assert claims["iss"] == f"https://sts.windows.net/{contoso}/"
    assert claims["roles"] == ["OnlineMeetings.ReadWrite.All", "OnlineMeetings.Read.All"]
