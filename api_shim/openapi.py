"""The OpenAPI document, completed: every request body, every status and media type the API
answers, and the bounds the server enforces.

FastAPI writes what the route signatures say. The rest is added here, once for all operations,
because it comes from layers around the routes: api_shim/guard.py (400 repeated parameter, 413,
415, 422 unstorable input), the bearer check (401, 403), the idempotency middleware (409, 422),
the audit trail (503 when it cannot be written), and the FHIR routes' own media type and
OperationOutcome errors. tests/e2e/test_fuzz_api.py runs Schemathesis against this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api_shim.errors import FHIR_JSON
from api_shim.schemas import CaseCreate
from medbatch.settings import Settings

_REF = "#/components/schemas/{model}"

_PROBLEM = {
    "type": "object",
    "required": ["type", "loc", "msg"],
    "properties": {
        "type": {"type": "string"},
        "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
        "msg": {"type": "string"},
    },
}
_ERROR = {
    "title": "Error",
    "description": "`detail`: a sentence, or problems naming the field and the rule (never the "
    "value sent); `total`: how many problems there were (at most MEDBATCH_MAX_REPORTED_PROBLEMS "
    "are listed).",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"$ref": "#/components/schemas/Problem"}},
                {"type": "object"},
            ]
        },
        "total": {"type": "integer", "minimum": 0},
    },
}


def _resource(
    title: str,
    resource_type: str,
    required: list[str],
    properties: dict[str, Any],
    description: str | None = None,
) -> dict[str, Any]:
    """The schema of a FHIR resource as the API documents it: its ``resourceType`` (always
    required) and the fields it names."""
    schema: dict[str, Any] = {"title": title}
    if description is not None:
        schema["description"] = description
    return schema | {
        "type": "object",
        "required": ["resourceType", *required],
        "properties": {"resourceType": {"const": resource_type}, **properties},
    }


_ARRAY = {"type": "array", "items": {"type": "object"}}
_STRING = {"type": "string"}
_OUTCOME = _resource(
    "OperationOutcome",
    "OperationOutcome",
    ["issue"],
    {
        "extension": _ARRAY,
        "issue": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"enum": ["fatal", "error", "warning", "information"]},
                    "code": _STRING,
                    "diagnostics": _STRING,
                    "expression": {"type": "array", "items": _STRING},
                },
            },
        },
    },
)
_BUNDLE_IN = _resource(
    "Bundle",
    "Bundle",
    ["type", "entry"],
    {
        "type": {"enum": ["transaction", "batch", "collection"]},
        "entry": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["resource"],
                "properties": {
                    "resource": {
                        "type": "object",
                        "required": ["resourceType"],
                        "properties": {"resourceType": {"type": "string", "minLength": 1}},
                    }
                },
            },
        },
    },
    description="A FHIR R4 Bundle (transaction, batch or collection) holding Patient "
    "resources and their Observations, Conditions, ...; validated as FHIR by the server.",
)
_BUNDLE_OUT = _resource(
    "BundleResponse",
    "Bundle",
    ["type"],
    {
        "type": {"enum": ["searchset", "batch-response", "transaction-response"]},
        "total": {"type": "integer", "minimum": 0},
        "entry": _ARRAY,
    },
)
_RISK = _resource(
    "RiskAssessment",
    "RiskAssessment",
    ["id", "status", "subject", "prediction"],
    {"id": _STRING, "status": _STRING, "subject": {"type": "object"}, "prediction": _ARRAY},
)
_CAPABILITY = _resource(
    "CapabilityStatement",
    "CapabilityStatement",
    ["status", "date", "kind", "fhirVersion", "format"],
    {
        "status": _STRING,
        "date": _STRING,
        "kind": _STRING,
        "fhirVersion": _STRING,
        "format": {"type": "array", "items": _STRING},
        "rest": _ARRAY,
    },
)
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Retry a POST safely: the same key with the same request gets the first "
    "answer again; with another request, 422; while the first runs, 409 (kept 48 hours).",
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
}

_WHY = {
    400: "a query parameter given twice, or (FHIR) input that is not FHIR",
    401: "missing, unknown, expired or revoked API key",
    403: "the API client lacks the scope this operation needs",
    404: "no such record for this tenant",
    406: "(FHIR) _format or Accept asks for a format other than JSON",
    409: "an Idempotency-Key whose first request is still running, or (cases) an external_id "
    "taken by a case with other content",
    413: "request body over MEDBATCH_MAX_BODY_BYTES (declared or chunked)",
    415: "a body that is not JSON",
    422: "input that breaks a rule: named by field, never echoed",
    503: "the database, or the audit trail, cannot be written: nothing was released",
}


def _error(status: int, media: str, schema: str) -> dict[str, Any]:
    return {
        "description": _WHY[status],
        "content": {media: {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _complete(path: str, method: str, op: dict[str, Any], settings: Settings) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    fhir = path.startswith("/v1/fhir")
    media, schema = (FHIR_JSON, "OperationOutcome") if fhir else ("application/json", "Error")
    statuses = [400, 413, 422, 503]
    if op.get("security"):
        statuses += [401, 403]
    if "{" in path:
        statuses.append(404)
    if fhir:
        statuses.append(406)
    if method == "post":
        statuses += [409, 415]
        op.setdefault("parameters", []).append(_IDEMPOTENCY_KEY)
    for status in statuses:
        responses[str(status)] = _error(status, media, schema)
    if fhir:
        for code, answer in responses.items():
            if code.startswith("2"):
                kind = (
                    "RiskAssessment"
                    if path.endswith("{score_id}")
                    else "CapabilityStatement"
                    if path.endswith("/metadata")
                    else "BundleResponse"
                )
                answer["content"] = {
                    FHIR_JSON: {"schema": {"$ref": f"#/components/schemas/{kind}"}}
                }
    for param in op.get("parameters", []):
        if path == "/v1/scores" and param["name"] == "limit":
            param["schema"]["maximum"] = settings.max_page_size


def _body(schema: str, *media: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {m: {"schema": {"$ref": f"#/components/schemas/{schema}"}} for m in media},
    }


def openapi_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    case = CaseCreate.model_json_schema(ref_template=_REF)
    schemas.update(case.pop("$defs", {}))
    schemas["CaseCreate"] = case
    schemas["Problem"] = _PROBLEM
    schemas.update(
        {s["title"]: s for s in (_ERROR, _OUTCOME, _BUNDLE_IN, _BUNDLE_OUT, _RISK, _CAPABILITY)}
    )
    # FastAPI's 422 schema, replaced by what the API answers (api_shim/errors.py).
    schemas["HTTPValidationError"] = _ERROR
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith("/v1/"):
                _complete(path, method, op, settings)
    doc["paths"]["/v1/fhir"]["post"]["requestBody"] = _body("Bundle", FHIR_JSON, "application/json")
    downloads = {
        "/v1/compound-similarity/{job_id}/files/neighbours.csv": "text/csv",
        "/v1/genome-comparisons/{job_id}/files/{name}": "application/octet-stream",
    }
    for path, media in downloads.items():
        doc["paths"][path]["get"]["responses"]["200"]["content"] = {
            media: {"schema": {"type": "string", "format": "binary"}}
        }
    doc["paths"]["/readyz"]["get"]["responses"]["503"] = {
        "description": "the database or the broker is unreachable (named in the body)",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    _examples_and_links(doc)
    app.openapi_schema = doc
    return doc


#: What a created record's id in a 202 answer leads to (OpenAPI links: clients and Schemathesis's
#: stateful phase follow them).
_LINKS = {
    ("/v1/cases", "$response.body#/cases/0/id"): [("/v1/cases/{case_id}", "case_id")],
    ("/v1/genome-comparisons", "$response.body#/id"): [
        ("/v1/genome-comparisons/{job_id}", "job_id"),
        ("/v1/genome-comparisons/{job_id}/pairs", "job_id"),
    ],
    ("/v1/compound-similarity", "$response.body#/id"): [
        ("/v1/compound-similarity/{job_id}", "job_id"),
        ("/v1/compound-similarity/{job_id}/neighbours", "job_id"),
    ],
}


def _examples_and_links(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    body = paths["/v1/cases"]["post"]["requestBody"]["content"]["application/json"]
    body["example"] = case_example()
    for (source, value), targets in _LINKS.items():
        answer = paths[source]["post"]["responses"]["202"]
        answer["links"] = {
            paths[target]["get"]["operationId"]: {
                "operationId": paths[target]["get"]["operationId"],
                "parameters": {name: value},
            }
            for target, name in targets
        }


def case_example() -> dict[str, Any]:
    """A real held-out Wisconsin case (public data), as POST /v1/cases takes it."""
    from models.reference import breast_cancer

    split = breast_cancer.split()
    features = dict(zip(split.feature_names, (float(v) for v in split.x_test[0]), strict=True))
    return {"external_id": "wdbc-0000", "model": "breast-cancer", "features": features}
