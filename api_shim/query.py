"""Query parameters a route does not take.

On the ``/v1`` routes they are refused (422, each named): ``GET /v1/scores?statu=done`` answered
every case as if unfiltered, and a client took the page for the filtered one. FHIR search
ignores them, as the FHIR search page asks of a server by default ("lenient"), unless the
client sends ``Prefer: handling=strict``: then 400 with an OperationOutcome naming each.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from api_shim.errors import problem

#: The longest parameter name an error repeats (the rest is cut: a name is the client's text).
NAME_CHARS = 64

_declared: dict[int, frozenset[str]] = {}


def _query_names(dependant: Any) -> set[str]:
    names = {f.alias for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def declared(route: APIRoute) -> frozenset[str]:
    """The query parameters ``route`` takes, its dependencies' included (computed once)."""
    names = _declared.get(id(route))
    if names is None:
        names = _declared[id(route)] = frozenset(_query_names(route.dependant))
    return names


def strict_handling(request: Request) -> bool:
    """``Prefer: handling=strict`` among the request's preferences (FHIR search)."""
    prefer = ",".join(request.headers.getlist("prefer"))
    return any(
        part.strip().replace(" ", "").lower() == "handling=strict" for part in prefer.split(",")
    )


async def known_query_only(request: Request) -> None:
    """Refuse query parameters the route does not take (FHIR: only with strict handling)."""
    route = request.scope.get("route")
    if not request.query_params or not isinstance(route, APIRoute):
        return
    if not request.url.path.startswith("/v1/"):
        return  # health and metrics: a prober's cache-buster is no mistake
    takes = declared(route)
    unknown = sorted({name for name in request.query_params if name not in takes})
    if not unknown:
        return
    if request.url.path.startswith("/v1/fhir") and not strict_handling(request):
        return
    known = ", ".join(sorted(takes)) or "none"
    raise RequestValidationError(
        [
            problem(
                ("query", name[:NAME_CHARS]),
                f"unknown query parameter; this route takes: {known}",
                "extra_forbidden",
            )
            for name in unknown
        ]
    )
