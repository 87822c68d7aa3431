"""The portal API's OpenAPI 3.1 document, generated from the wire models (never hand-written).

Schemas come from :mod:`connector_core.service.portal_models` (``model_json_schema`` through
``models_json_schema``); paths, parameters and status codes are listed here once, next to the
routes they describe, and a unit test checks every route in functions/portal.py is documented.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from connector_core.service.portal_models import (
    ConfigChangeOut,
    ConfigInput,
    ConfigOut,
    EhrSigninOut,
    Problem,
)

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_PROBLEM_JSON = "application/problem+json"

_STATUS_TEXT = {
    400: "Invalid input: problem+json naming the field and the failed check",
    401: "Missing, invalid or expired Entra ID access token",
    403: "Authenticated, but not allowed (role or approver)",
    404: "No such config in the caller's tenant",
    409: "Duplicate FHIR base URL (existingId), or not allowed in the current state",
    412: "Stale If-Match ETag",
    413: "Request body larger than 64 KiB",
    428: "If-Match header required",
    502: "The EHR or Microsoft Entra ID failed",
    503: "Storage unavailable",
}


def _problems(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": _STATUS_TEXT[code],
            "content": {_PROBLEM_JSON: {"schema": {"$ref": _REF.format(model="Problem")}}},
        }
        for code in codes
    }


def _json(description: str, schema: dict[str, Any], *, etag: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if etag:
        response["headers"] = {"ETag": {"$ref": "#/components/headers/ETag"}}
    return response


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}
_VISIT_REPORT: dict[str, Any] = {
    "type": "object",
    "required": ["from", "to", "generatedAt", "summary", "visits"],
    "properties": {
        "from": {"type": "string", "format": "date"},
        "to": {"type": "string", "format": "date"},
        "generatedAt": {"type": "string", "format": "date-time"},
        "summary": {
            "type": "object",
            "required": [
                "visits",
                "completed",
                "noShows",
                "medianLobbyWaitSeconds",
                "medianDurationSeconds",
                "totalDurationSeconds",
            ],
            "properties": {
                "visits": {"type": "integer"},
                "completed": {"type": "integer"},
                "noShows": {"type": "integer"},
                "medianLobbyWaitSeconds": _NUMBER_OR_NULL,
                "medianDurationSeconds": _NUMBER_OR_NULL,
                "totalDurationSeconds": {"type": "integer"},
            },
        },
        "visits": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["visitKey", "configId", "status"],
                "properties": {
                    "visitKey": {"type": "string"},
                    "configId": {"type": "string"},
                    "environment": {"enum": ["test", "production", None]},
                    "departmentId": _STRING_OR_NULL,
                    "scheduledStart": {"type": "string", "format": "date-time"},
                    "startedAt": _STRING_OR_NULL,
                    "endedAt": _STRING_OR_NULL,
                    "durationSeconds": _NUMBER_OR_NULL,
                    "lobbyWaitSeconds": _NUMBER_OR_NULL,
                    "attendants": {"type": "integer"},
                    "staffCount": {"type": "integer"},
                    "guestCount": {"type": "integer"},
                    "organizerOid": _STRING_OR_NULL,
                    "status": {"enum": ["completed", "no_show", "in_progress"]},
                },
            },
        },
    },
}

_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The config id",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,64}$"},
}


def _if_match(required: bool) -> dict[str, Any]:
    return {
        "name": "If-Match",
        "in": "header",
        "required": required,
        "description": "The ETag of the config as last read (GET)",
        "schema": {"type": "string", "minLength": 1},
    }


def _paths() -> dict[str, Any]:
    common = (401, 503)
    body = {
        "required": True,
        "content": {"application/json": {"schema": _ref("ConfigInput")}},
    }
    return {
        "/configs": {
            "get": {
                "operationId": "listConfigs",
                "summary": "Configs of the caller's tenant (admins, auditors) or those the "
                "caller approves",
                "responses": {
                    "200": _json("The configs", {"type": "array", "items": _ref("ConfigOut")}),
                    **_problems(*common),
                },
            },
            "post": {
                "operationId": "createConfig",
                "summary": "Register a FHIR base URL (admin); validates the URL and the EHR",
                "requestBody": body,
                "responses": {
                    "201": _json("Created, pending approval", _ref("ConfigOut"), etag=True),
                    **_problems(400, 403, 409, 413, *common),
                },
            },
        },
        "/configs/{id}": {
            "parameters": [_ID_PARAM],
            "get": {
                "operationId": "getConfig",
                "summary": "One config (admins, auditors, its approver)",
                "responses": {
                    "200": _json("The config", _ref("ConfigOut"), etag=True),
                    **_problems(403, 404, *common),
                },
            },
            "put": {
                "operationId": "updateConfig",
                "summary": "Replace the editable fields (admin); a real change needs a new "
                "approval",
                "parameters": [_if_match(True)],
                "requestBody": body,
                "responses": {
                    "200": _json("The updated config", _ref("ConfigOut"), etag=True),
                    **_problems(400, 403, 404, 409, 412, 413, 428, *common),
                },
            },
            "delete": {
                "operationId": "deleteConfig",
                "summary": "Remove a config (admin)",
                "parameters": [_if_match(False)],
                "responses": {
                    "204": {"description": "Deleted"},
                    **_problems(403, 404, 412, *common),
                },
            },
        },
        "/configs/{id}/history": {
            "parameters": [_ID_PARAM],
            "get": {
                "operationId": "getConfigHistory",
                "summary": "The config's audit trail: who changed what, when",
                "responses": {
                    "200": _json(
                        "Oldest first", {"type": "array", "items": _ref("ConfigChangeOut")}
                    ),
                    **_problems(403, 404, *common),
                },
            },
        },
        "/configs/{id}/ehr-signin": {
            "parameters": [_ID_PARAM],
            "post": {
                "operationId": "startEhrSignin",
                "summary": "The approver's SMART standalone launch (PKCE S256) to prove EHR "
                "access; open authorizeUrl in the browser",
                "responses": {
                    "200": _json("Where to send the browser", _ref("EhrSigninOut")),
                    **_problems(403, 404, 502, *common),
                },
            },
        },
        "/configs/{id}/approve": {
            "parameters": [_ID_PARAM],
            "post": {
                "operationId": "approveConfig",
                "summary": "Approve (the approver, after an EHR sign-in in the last 30 minutes)",
                "parameters": [_if_match(False)],
                "responses": {
                    "200": _json(
                        "Approved; carries integrationRecords", _ref("ConfigOut"), etag=True
                    ),
                    **_problems(403, 404, 409, 412, *common),
                },
            },
        },
        "/ehr-signin/callback": {
            "get": {
                "operationId": "ehrSigninCallback",
                "summary": "Browser redirect target of the EHR sign-in (not called by the portal)",
                "security": [],
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                    for n in ("code", "state", "error", "error_description")
                ],
                "responses": {
                    "200": {
                        "description": "Sign-in recorded (HTML page)",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    "302": {"description": "Sign-in recorded; back to the portal"},
                    "default": {
                        "description": "An HTML page saying what went wrong and what to do",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                },
            },
        },
        "/reports/visits": {
            "get": {
                "operationId": "getVisitReport",
                "summary": "Usage report of the caller's tenant (Connector.Admin or "
                "Connector.Auditor): totals, medians and one row per visit; JSON or RFC 4180 CSV",
                "parameters": [
                    *(
                        {
                            "name": n,
                            "in": "query",
                            "required": True,
                            "description": "UTC date, inclusive; at most 366 days in all",
                            "schema": {"type": "string", "format": "date"},
                        }
                        for n in ("from", "to")
                    ),
                    {
                        "name": "configId",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9-]{1,64}$"},
                    },
                    {
                        "name": "departmentId",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$",
                        },
                    },
                    {
                        "name": "format",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["json", "csv"]},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The report (docs/reports.md)",
                        "content": {
                            "application/json": {"schema": _VISIT_REPORT},
                            "text/csv": {"schema": {"type": "string"}},
                        },
                    },
                    **_problems(400, 403, 401, 503),
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenApi",
                "summary": "This document",
                "security": [],
                "responses": {"200": _json("OpenAPI 3.1", {"type": "object"})},
            },
        },
    }


@functools.cache
def _schemas() -> dict[str, Any]:
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema(
        [
            (ConfigInput, "validation"),
            (ConfigOut, "serialization"),
            (ConfigChangeOut, "serialization"),
            (EhrSigninOut, "serialization"),
            (Problem, "serialization"),
        ],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    return schemas


@functools.cache
def _document_text(server_url: str) -> str:
    doc = {
        "openapi": "3.1.0",
        "info": {
            "title": "EHR virtual-visit connector: configuration portal API",
            "version": "1.0.0",
            "description": "Register a FHIR base URL, prove EHR access, approve, and read the "
            "integration records to enter in the EHR. Bearer tokens are Entra ID access "
            "tokens for the connector's API; records are partitioned by the token's tenant.",
        },
        "servers": [{"url": server_url}],
        "security": [{"entra": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "entra": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "headers": {
                "ETag": {
                    "description": "Version of the config; send it back as If-Match",
                    "schema": {"type": "string"},
                }
            },
        },
    }
    return json.dumps(doc, separators=(",", ":"))


def openapi_document(server_url: str) -> dict[str, Any]:
    """The document (a fresh copy; built once per process and server URL)."""
    result: dict[str, Any] = json.loads(_document_text(server_url))
    return result
