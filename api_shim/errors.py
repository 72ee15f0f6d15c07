"""Error bodies: they name the field and the rule, never the caller's values, and always encode.

A validation error lists at most ``limit`` problems and says how many there were in all, so a
request with a hundred thousand bad entries costs a short answer, not one the size of the request.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError, ValidatorFunctionWrapHandler
from pydantic_core import InitErrorDetails

from models.cases.registry import ModelSpec, Registry, RegistryError

FHIR_JSON = "application/fhir+json"
#: Extension of an OperationOutcome that lists only some issues: how many there were.
TOTAL_EXTENSION = "urn:medbatch:issues-total"


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a lone surrogate can never make the body
    unencodable (the 500 that a 422 about such a string used to turn into)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode("ascii")


def problem(loc: Sequence[Any], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"type": kind, "loc": list(loc), "msg": msg}


def keys_hidden(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A wrap validator for a dict whose keys are the caller's text (feature names, external
    ids): a problem with an entry is located at ``*`` instead of at its key, which may be a
    patient's name or record number (``WrapValidator(keys_hidden)``)."""
    try:
        return handler(value)
    except ValidationError as exc:
        errors = exc.errors()
        if not any(e["loc"] for e in errors):
            raise
        raise ValidationError.from_exception_data(
            exc.title,
            [
                InitErrorDetails(
                    type=e["type"],
                    loc=("*", *e["loc"][1:]) if e["loc"] else (),
                    input=e["input"],
                    ctx=e.get("ctx", {}),
                )
                for e in errors
            ],
        ) from None


def bounded(problems: Sequence[Mapping[str, Any]], limit: int) -> dict[str, Any]:
    """``{"detail": the first limit problems, "total": how many}``: the 422 body."""
    detail = [
        {
            "type": str(p.get("type")),
            "loc": [_loc(x) for x in p.get("loc", ())],
            "msg": str(p.get("msg")),
        }
        for p in problems[:limit]
    ]
    return {"detail": detail, "total": len(problems)}


def _loc(part: Any) -> str | int:
    return part if isinstance(part, int) and not isinstance(part, bool) else str(part)


def outcome_body(issues: Iterable[Mapping[str, Any]], limit: int) -> dict[str, Any]:
    """An OperationOutcome with at most ``limit`` issues; when there were more, the count of all
    in an extension (``urn:medbatch:issues-total``)."""
    listed = list(issues)
    body: dict[str, Any] = {"resourceType": "OperationOutcome", "issue": listed[:limit]}
    if len(listed) > limit:
        body["extension"] = [{"url": TOTAL_EXTENSION, "valueInteger": len(listed)}]
    return body


def fhir_issue(code: str, diagnostics: str, expression: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        out["expression"] = [expression]
    return out


_FHIR_CODE: dict[Any, str] = {
    413: "too-costly",
    415: "not-supported",
    503: "transient",
    "json_invalid": "structure",
    "too_deep": "structure",
    "number_too_large": "structure",
    "duplicate_key": "structure",
}


_SENTENCE = frozenset({413, 415, 503})


def error_response(
    path: str, status: int, problems: Sequence[Mapping[str, Any]], *, limit: int
) -> SafeJSONResponse:
    """Problems as the route family answers them: OperationOutcome under /v1/fhir, else
    ``{"detail": [...], "total": n}``."""
    if path.startswith("/v1/fhir"):
        issues = [
            fhir_issue(
                _FHIR_CODE.get(status) or _FHIR_CODE.get(str(p.get("type")), "invalid"),
                str(p["msg"]),
                ".".join(str(x) for x in p.get("loc", ())),
            )
            for p in problems
        ]
        return SafeJSONResponse(outcome_body(issues, limit), status, media_type=FHIR_JSON)
    if status in _SENTENCE and len(problems) == 1:
        # Not about a field: a sentence, as FastAPI answers an HTTPException.
        return SafeJSONResponse({"detail": str(problems[0]["msg"])}, status)
    return SafeJSONResponse(bounded(problems, limit), status)


def resolve_model(registry: Registry, ref: str) -> ModelSpec:
    """``registry.resolve(ref)``, its error reworded so that it does not repeat ``ref``."""
    try:
        return registry.resolve(ref)
    except RegistryError:
        raise RegistryError(model_problem(registry, ref)) from None


def model_problem(registry: Registry, ref: str) -> str:
    """Why ``ref`` names no usable model, naming only what the registry holds."""
    name, _, version = ref.partition("@")
    if name not in registry.names():
        return f"unknown model name (known models: {', '.join(registry.names()) or 'none'})"
    versions = ", ".join(s.version for s in registry if s.name == name)
    if version and any(s.name == name and s.version == version for s in registry):
        live = ", ".join(s.version for s in registry if s.name == name and s.status != "retired")
        return f"that version of {name} is retired (versions in use: {live or 'none'})"
    if version:
        return f"unknown version of {name} (versions: {versions})"
    return f"every version of {name} is retired (versions: {versions})"
