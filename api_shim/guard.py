"""The gate every request passes before a route sees it: bounded, well-formed, storable input.

- A body is read whole, up to ``max_bytes``: over it (declared or chunked) is 413, on every route.
- A body must be JSON (415 for another media type, or for any Content-Encoding: it is read
  as it came, never inflated), nested at most ``max_depth`` deep, without
  NaN/Infinity, numbers that overflow a double or integers beyond 64 bits, and without strings
  PostgreSQL cannot store (NUL) or UTF-8 cannot encode (lone surrogates: escaped, or sent as
  raw bytes, which json.loads lets through), and without a key
  given twice in one object (parsers disagree on which one counts). The parsed value is
  handed on in ``scope["state"]["json_body"]``, so routes do not parse it again.
- A query parameter given twice is 400: a route would answer for one value while the audit
  trail might name the other. A NUL in a query parameter is refused like one in a body.
- An ``Authorization`` header given twice is 400: the route would authenticate one key while
  the idempotency ledger (api_shim/idempotency.py) filed the answer under the other's client.

Refusals name the field and the rule, never the value (see api_shim/errors.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_shim.errors import error_response, problem

#: Largest magnitude of an integer in a body: ids and counts are 64-bit columns.
MAX_INT = 2**63 - 1

#: ``application/json+fhir`` is the FHIR DSTU2 type that integration engines still send.
_JSON_TYPES = ("application/json", "application/fhir+json", "application/json+fhir")
#: A \u escape that may make a NUL or a lone surrogate: only then are the strings walked.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
#: A surrogate encoded as UTF-8 bytes (never valid UTF-8, but json.loads decodes bytes with
#: "surrogatepass"), or a NUL byte: a UTF-16 or UTF-32 body, which may hold a lone surrogate.
_SUSPECT_BYTES = re.compile(rb"\xed[\xa0-\xbf]|\x00")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class _Refused(Exception):
    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status, self.problem = status, problem


class _TooLarge(Exception):
    pass


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in a JSON text (brackets inside strings do not count).

    Linear in the body's length whatever it holds (numpy): a quote is a string's edge unless an
    odd run of backslashes stands before it, and a bracket counts when an even number of edges
    comes before it.
    """
    codes = np.frombuffer(body, dtype=np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    brackets = np.flatnonzero(opens | (codes == ord("]")) | (codes == ord("}")))
    if not len(brackets):
        return 0
    quotes = np.flatnonzero(codes == ord('"'))
    slashes = np.flatnonzero(codes == ord("\\"))
    if len(quotes) and len(slashes):
        starts = np.ones(len(slashes), dtype=bool)
        starts[1:] = slashes[1:] != slashes[:-1] + 1
        run_start = np.maximum.accumulate(np.where(starts, slashes, 0))
        j = np.minimum(np.searchsorted(slashes, quotes - 1), len(slashes) - 1)
        escaped = (slashes[j] == quotes - 1) & ((quotes - run_start[j]) % 2 == 1)
        quotes = quotes[~escaped]
    outside = np.searchsorted(quotes, brackets) % 2 == 0
    steps = np.where(opens[brackets], 1, -1)[outside]
    return int(np.cumsum(steps).max()) if len(steps) else 0


class _BadNumber(Exception):
    pass


class _DuplicateKey(Exception):
    pass


#: Stands, in a leniently parsed object, for the key that came twice (never a JSON key).
_TWICE = object()


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _DuplicateKey
    return value


def _duplicate_problem(body: bytes) -> dict[str, Any]:
    """Where the first object with a key given twice is (parsed again, leniently: only a refused
    body pays for it); the key is named only if it is a field name."""

    def lenient(pairs: list[tuple[str, Any]]) -> dict[Any, Any]:
        value: dict[Any, Any] = {}
        for key, item in pairs:
            if key in value and _TWICE not in value:
                value[_TWICE] = key
            value[key] = item
        return value

    try:
        parsed = json.loads(body, object_pairs_hook=lenient)
    except ValueError:  # the duplicate came before a syntax error
        return problem(("body",), "body is not valid JSON", "json_invalid")
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), parsed)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            if _TWICE in item:
                return problem(
                    ("body", *path, _name(item[_TWICE])),
                    "a key given twice in one object",
                    "duplicate_key",
                )
            children = [((*path, _name(k)), v) for k, v in item.items() if k is not _TWICE]
        elif isinstance(item, list):
            children = [((*path, i), v) for i, v in enumerate(item)]
        else:
            continue
        stack.extend(reversed(children))
    return problem(("body",), "a key given twice in one object", "duplicate_key")


def _refuse_constant(name: str) -> Any:
    raise _BadNumber


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber
    return value


def _parse_int(text: str) -> int:
    if len(text) > 20 or abs(value := int(text)) > MAX_INT:
        raise _BadNumber
    return value


def _number_problem(body: bytes) -> dict[str, Any]:
    """Where the first number that is not finite, or not a 64-bit integer, is (parsed again,
    leniently: only a refused body pays for it)."""
    try:
        lenient = json.loads(body, parse_int=lambda t: int(t) if len(t) <= 4300 else math.inf)
    except ValueError:  # the number came before a syntax error
        return problem(("body",), "body is not valid JSON", "json_invalid")
    for path, value in _leaves(lenient):
        if isinstance(value, float) and not math.isfinite(value):
            return problem(("body", *path), "must be a finite number", "finite_number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            return problem(("body", *path), "must fit in 64 bits", "number_too_large")
    return problem(("body",), "holds a number out of range", "number_too_large")


def _leaves(value: Any) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Every scalar with its path, in document order (keys that are not field names as '*')."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            children = [((*path, _name(k)), v) for k, v in item.items()]
        elif isinstance(item, list):
            children = [((*path, i), v) for i, v in enumerate(item)]
        else:
            yield path, item
            continue
        stack.extend(reversed(children))


def _name(key: str) -> str:
    return key if _FIELD.fullmatch(key) else "*"


def parse_json(body: bytes, *, max_depth: int) -> Any:
    """Parse a request body under the rules above; raise :class:`_Refused` saying which broke."""
    depth = json_depth(body)
    if depth > max_depth:
        raise _Refused(
            422,
            problem(("body",), f"JSON nested {depth} levels deep; at most {max_depth}", "too_deep"),
        )
    try:
        value = json.loads(
            body,
            parse_constant=_refuse_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
            object_pairs_hook=_object,
        )
    except _BadNumber:
        raise _Refused(422, _number_problem(body)) from None
    except _DuplicateKey:
        raise _Refused(422, _duplicate_problem(body)) from None
    except RecursionError:  # unbalanced brackets can fool the depth count; the parser cannot
        raise _Refused(
            422, problem(("body",), f"JSON nested deeper than {max_depth} levels", "too_deep")
        ) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError; their text holds no input
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise _Refused(
            422, problem(("body",), f"body is not valid JSON: {reason}", "json_invalid")
        ) from None
    if _SUSPECT_ESCAPE.search(body) or _SUSPECT_BYTES.search(body):
        for path, why in _bad_strings(value):
            raise _Refused(422, problem(("body", *path), why, "string_unsafe"))
    return value


def _bad_strings(value: Any) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Where a string (key or value) holds a NUL or a lone surrogate, and which."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                here = (*path, _name(key))
                if (why := _string_problem(key)) is not None:
                    yield here, f"a key {why}"
                stack.append((here, child))
        elif isinstance(item, list):
            stack.extend(((*path, i), child) for i, child in enumerate(item))
        elif isinstance(item, str) and (why := _string_problem(item)) is not None:
            yield path, f"a string {why}"


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (U+0000), which cannot be stored"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone UTF-16 surrogate, which is not a character"
    return None


class InputGuard:
    """ASGI middleware applying the rules of this module to every HTTP request."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, max_depth: int, max_problems: int = 20
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.max_problems = max_problems

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_headers(scope)
            self._check_query(scope)
            body = await self._read(scope, receive)
            if body:
                scope.setdefault("state", {})["json_body"] = self._check_body(scope, body)
        except _Refused as exc:
            await self._answer(scope, send, exc.status, exc.problem)
            return
        except _TooLarge:
            await self._answer(
                scope,
                send,
                413,
                problem(
                    ("body",),
                    f"request body over {self.max_bytes} bytes; split the submission",
                    "too_large",
                ),
            )
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, scope: Scope) -> None:
        if sum(1 for name, _ in scope.get("headers", ()) if name == b"authorization") > 1:
            raise _Refused(
                400,
                problem(
                    ("header", "authorization"), "give the Authorization header once", "repeated"
                ),
            )

    def _check_query(self, scope: Scope) -> None:
        raw = scope.get("query_string", b"").decode("latin-1")
        seen: set[str] = set()
        for name, value in parse_qsl(raw, keep_blank_values=True):
            label = name if _FIELD.fullmatch(name) else "*"
            if "\x00" in name or "\x00" in value:
                raise _Refused(
                    422,
                    problem(("query", label), "holds a NUL character (U+0000)", "string_unsafe"),
                )
            if name in seen:
                raise _Refused(
                    400,
                    problem(("query", label), "give each query parameter once", "repeated"),
                )
            seen.add(name)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise _TooLarge
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _check_body(self, scope: Scope, body: bytes) -> Any:
        headers = dict(scope["headers"])
        if headers.get(b"content-encoding", b"identity").strip().lower() != b"identity":
            # Inflating would let a small request grow past max_bytes; the bytes as they came
            # are not JSON, and "not valid JSON" would not say why.
            raise _Refused(
                415,
                problem(
                    ("header", "content-encoding"),
                    "send the body uncompressed, without Content-Encoding",
                    "unsupported_media_type",
                ),
            )
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        media = content_type.partition(";")[0].strip().lower()
        if media and media not in _JSON_TYPES and not media.endswith("+json"):
            raise _Refused(
                415,
                problem(
                    ("header", "content-type"),
                    "send the body as application/fhir+json or application/json"
                    if scope["path"].startswith("/v1/fhir")
                    else "send the body as application/json",
                    "unsupported_media_type",
                ),
            )
        return parse_json(body, max_depth=self.max_depth)

    async def _answer(self, scope: Scope, send: Send, status: int, found: dict[str, Any]) -> None:
        if status == 422 and scope["path"].startswith("/v1/fhir"):
            status = 400  # FHIR routes keep 422 for valid FHIR that breaks a rule
        response = error_response(scope["path"], status, [found], limit=self.max_problems)
        await response(scope, _disconnected, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read already, then the client's own messages (a disconnect, when it comes)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
