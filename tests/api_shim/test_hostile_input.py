"""Hostile input, one test per class that once gave a 5xx, escaped a folder, skipped the audit
trail or amplified a response (issue 14). Real PostgreSQL and Redis; the API in process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api_shim.guard import json_depth
from db import repo
from db.engine import session_scope
from db.tables import AuditEvent, Case, GenomeJob, Priority
from tests.helpers import score_row, tenant_headers, wdbc_cases

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "genome"
BIG = 2**64
FHIR_JSON = "application/fhir+json"


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """tmp/genotypes (the allowed folder) with hm3_small, and hm3_small copied *beside* it as
    tmp/genotypes.{bed,bim,fam} and into tmp/outside/: what an escape would read."""
    root = tmp_path / "genotypes"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (tmp_path / "compounds").mkdir()
    (tmp_path / "compounds" / "lib.csv").write_text("id,smiles\nethanol,CCO\nphenol,c1ccccc1O\n")
    for ext in (".bed", ".bim", ".fam"):
        data = (DATA / f"hm3_small{ext}").read_bytes()
        (root / f"hm3_small{ext}").write_bytes(data)
        (tmp_path / f"genotypes{ext}").write_bytes(data)
        (outside / f"hm3_small{ext}").write_bytes(data)
    return tmp_path


@pytest.fixture
def api_settings(folders: Path) -> dict[str, object]:
    return {
        "genotype_dir": folders / "genotypes",
        "compound_dir": folders / "compounds",
        "max_body_bytes": 256 * 1024,
    }


@pytest.fixture
def auth(pg_sessions: sessionmaker[Session]) -> dict[str, str]:
    return tenant_headers(pg_sessions, "hospital")


def _cases(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return s.scalar(select(func.count()).select_from(Case)) or 0


def _json_post(api: TestClient, path: str, raw: str | bytes, headers: dict[str, str], **kw: Any):  # type: ignore[no-untyped-def]
    ctype = FHIR_JSON if path.startswith("/v1/fhir") else "application/json"
    return api.post(path, content=raw, headers={**headers, "Content-Type": ctype}, **kw)


# -- 1. ids and cursors beyond 64 bits ----------------------------------------------------------

BY_ID = [
    "/v1/cases/{}",
    "/v1/genome-comparisons/{}",
    "/v1/genome-comparisons/{}/pairs",
    "/v1/genome-comparisons/{}/files/x.rel",
    "/v1/compound-similarity/{}",
    "/v1/compound-similarity/{}/neighbours",
    "/v1/compound-similarity/{}/files/neighbours.csv",
    "/v1/fhir/RiskAssessment/{}",
]


def test_ids_beyond_64_bits_are_refused_on_every_by_id_route(
    api: TestClient, auth: dict[str, str]
) -> None:
    """2^63 and 2^64: refused by the schema's bound (was "bigint out of range", 500)."""
    for route in BY_ID:
        for big in (2**63, BIG, 10**40):
            response = api.get(route.format(big), headers=auth)
            expected = 400 if route.startswith("/v1/fhir") else 422
            assert response.status_code == expected, (route, response.text)
        # The largest 64-bit id is a fine id that names nothing.
        assert api.get(route.format(2**63 - 1), headers=auth).status_code == 404, route


def test_cursors_beyond_64_bits_are_refused(api: TestClient, auth: dict[str, str]) -> None:
    for route in (
        "/v1/scores",
        "/v1/genome-comparisons/1/pairs",
        "/v1/compound-similarity/1/neighbours",
    ):
        response = api.get(route, params={"cursor": str(BIG)}, headers=auth)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["query", "cursor"]


# -- 2. dates at the calendar's edges with an offset --------------------------------------------


@pytest.mark.parametrize(
    ("since", "found"),
    [("0001-01-01T00:00:00+01:00", 1), ("9999-12-31T23:59:59-01:00", 0)],
)
def test_since_at_the_calendar_edges_is_answered(
    api: TestClient, auth: dict[str, str], since: str, found: int
) -> None:
    """A moment whose UTC time leaves years 1..9999 is the first/last moment (was OverflowError)."""
    assert api.post("/v1/cases", json=wdbc_cases(1), headers=auth).status_code == 202
    response = api.get("/v1/scores", params={"since": since}, headers=auth)
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == found


@pytest.mark.parametrize(
    "as_of", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-05:00", "1800-01-01T00:00:00Z"]
)
def test_as_of_at_the_calendar_edges_is_refused_by_name(
    api: TestClient, auth: dict[str, str], as_of: str
) -> None:
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": []}
    response = api.post(
        "/v1/fhir",
        params={"as_of": as_of},
        json=bundle,
        headers={**auth, "Content-Type": FHIR_JSON},
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == FHIR_JSON
    (issue,) = response.json()["issue"]
    assert issue["expression"] == ["as_of"] and "1900" in issue["diagnostics"]


# -- 3. deeply nested JSON ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/cases", "/v1/fhir", "/v1/genome-comparisons"])
def test_deeply_nested_json_is_refused_before_parsing(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session], path: str
) -> None:
    """Nesting beyond max_json_depth (32): 422 / 400, never RecursionError's 500."""
    for depth in (33, 1_000, 100_000):
        _deep(api, auth, path, depth)
    assert _cases(pg_sessions) == 0


def _deep(api: TestClient, auth: dict[str, str], path: str, depth: int) -> None:
    case = wdbc_cases(1)[0]
    raw = json.dumps(case).replace(
        '"features": {', '"features": {"deep": ' + "[" * depth + "]" * depth + ", ", 1
    )
    response = _json_post(api, path, raw, auth)
    assert response.status_code == (400 if path == "/v1/fhir" else 422), response.text
    assert "nested" in response.text and "32" in response.text


def test_unbalanced_brackets_are_refused(api: TestClient, auth: dict[str, str]) -> None:
    response = _json_post(api, "/v1/cases", "[" * 200_000, auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] in ("too_deep", "json_invalid")


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert json_depth(b'{"a": "[[[[{{{{", "b": [[1]], "c": "\\"[[["}') == 3
    assert json_depth(b"[]") == 1 and json_depth(b'"x"') == 0 and json_depth(b"") == 0
    assert json_depth(b'"\\\\"[[') == 2  # an escaped backslash, then a real quote
    assert json_depth(b'"\\\\\\"[["') == 0  # an escaped quote: still inside the string


def test_json_depth_matches_the_parsed_depth_on_random_documents() -> None:
    import random

    def depth(value: Any) -> int:
        if isinstance(value, dict | list):
            items = value.values() if isinstance(value, dict) else value
            return 1 + max((depth(v) for v in items), default=0)
        return 0

    def document(level: int) -> Any:
        r = random.random()
        if level > 6 or r < 0.3:
            return random.choice(['a"[\\', "]}\\\\", "x", 1, None, '\\"{'])
        if r < 0.65:
            return [document(level + 1) for _ in range(random.randint(0, 3))]
        keys = ["k[", 'q\\"', "{x"]
        return {
            random.choice(keys) + str(i): document(level + 1) for i in range(random.randint(0, 3))
        }

    random.seed(14)
    for _ in range(2_000):
        value = document(0)
        raw = json.dumps(value, ensure_ascii=random.random() < 0.5).encode()
        assert json_depth(raw) == depth(value), raw


def test_escaped_quotes_do_not_cost_quadratic_time(api: TestClient, auth: dict[str, str]) -> None:
    """200 KB of escaped quotes: a regex that strips strings spent minutes on this (it would hit
    the test timeout); the bracket count is linear."""
    raw = b'"' + b'\\"' * 100_000
    response = _json_post(api, "/v1/cases", raw, auth)
    assert response.status_code == 422 and "not valid JSON" in response.text


# -- 4. text PostgreSQL cannot store, and 5. strings UTF-8 cannot encode -------------------------


@pytest.mark.parametrize(
    ("mutate", "loc"),
    [
        (lambda c: {**c, "external_id": "MRN\u00001"}, ["body", 0, "external_id"]),
        (
            lambda c: {**c, "features": {**c["features"], "a\u0000b": 1.0}},
            ["body", 0, "features", "*"],
        ),
        (lambda c: {**c, "external_id": "MRN\ud8001"}, ["body", 0, "external_id"]),
        (
            lambda c: {**c, "features": {**c["features"], "\udc00name": 1.0}},
            ["body", 0, "features"],
        ),
    ],
    ids=["NUL in external_id", "NUL in a feature name", "lone surrogate", "lone low surrogate"],
)
def test_unstorable_strings_in_a_body_are_422_and_the_answer_encodes(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session], mutate, loc
) -> None:  # type: ignore[no-untyped-def]
    raw = json.dumps([mutate(wdbc_cases(1)[0])])  # ensure_ascii: sent as \\u escapes
    response = _json_post(api, "/v1/cases", raw, auth)
    assert response.status_code == 422, response.text
    response.content.decode("ascii")  # every answer encodes (was: the 422 itself could not)
    (error,) = response.json()["detail"]
    assert error["loc"][: len(loc)] == loc and error["type"] == "string_unsafe"
    assert _cases(pg_sessions) == 0


def test_a_surrogate_sent_as_raw_bytes_is_refused_like_an_escaped_one(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    """json.loads decodes bytes with "surrogatepass": a surrogate sent as UTF-8 bytes (ED A0 80)
    or in a UTF-16 body passed the gate. In a Bundle entry's fullUrl it was stored in the case's
    basis, and every RiskAssessment search of that patient was a 500 from then on."""
    bundle = json.loads(
        (Path(__file__).parents[2] / "examples" / "patient-bundle.json").read_text()
    )
    bundle["entry"][1]["fullUrl"] = "urn:uuid:SURROGATE"
    assert "id" not in bundle["entry"][1]["resource"]  # cited by its fullUrl
    raw = json.dumps(bundle).encode().replace(b"SURROGATE", b"\xed\xa0\x80")
    response = _json_post(api, "/v1/fhir?as_of=2020-01-01T00:00:00Z", raw, auth)
    assert response.status_code == 400, response.text
    (issue,) = response.json()["issue"]
    assert issue["expression"] == ["body.entry.1.fullUrl"] and "surrogate" in issue["diagnostics"]
    case = {**wdbc_cases(1)[0], "external_id": "MRN\ud800"}
    sent = json.dumps([case], ensure_ascii=False).encode("utf-16", "surrogatepass")
    response = _json_post(api, "/v1/cases", sent, auth)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", 0, "external_id"] and error["type"] == "string_unsafe"
    assert _cases(pg_sessions) == 0


def test_a_lone_surrogate_stored_before_the_gate_refused_it_is_answered(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    """A case stored with one in its basis (before the gate above) made every RiskAssessment
    search and read of the patient a 500 (UnicodeEncodeError)."""
    _scored_patient(pg_sessions)
    with session_scope(pg_sessions) as s:
        case = s.scalars(select(Case)).one()
        case.context = {"basis": ["Patient/p1", "urn:uuid:\ud800"]}
    search = api.get("/v1/fhir/RiskAssessment", params={"subject": "Patient/p1"}, headers=auth)
    assert search.status_code == 200, search.text
    (entry,) = search.json()["entry"]
    assert entry["resource"]["basis"][1] == {"reference": "urn:uuid:\ud800"}
    read = api.get(f"/v1/fhir/{entry['fullUrl']}", headers=auth)
    assert read.status_code == 200 and read.json()["basis"] == entry["resource"]["basis"]


def test_nul_in_a_query_parameter_is_refused(api: TestClient, auth: dict[str, str]) -> None:
    for route, param in (
        ("/v1/scores", "model"),
        ("/v1/compound-similarity/1/neighbours", "query_id"),
        ("/v1/fhir/RiskAssessment", "subject"),
    ):
        response = api.get(route, params={param: "breast\u0000cancer"}, headers=auth)
        assert response.status_code == (400 if "fhir" in route else 422), response.text
        assert "breast" not in response.text


def test_nul_in_a_path_is_audited_as_an_escape(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    """A NUL in a path parameter reaches the audit row written out, not as a failed insert."""
    response = api.get("/v1/models/x%00y", headers=auth)
    assert response.status_code == 404
    with pg_sessions() as s:
        (resource,) = s.scalars(select(AuditEvent.resource)).all()
    assert resource == "name=x\\x00y"


def test_numbers_out_of_range_are_refused_where_they_are(
    api: TestClient, auth: dict[str, str]
) -> None:
    case = wdbc_cases(1)[0]
    for literal in ("NaN", "-Infinity", "1e400", str(BIG), "9" * 5000):
        raw = json.dumps([case]).replace(json.dumps(case["features"]["mean_area"]), literal, 1)
        response = _json_post(api, "/v1/cases", raw, auth)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body", 0, "features", "mean_area"], literal


def test_a_body_that_is_not_json_is_415(api: TestClient, auth: dict[str, str]) -> None:
    response = api.post(
        "/v1/cases", content=b"external_id=1", headers={**auth, "Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    assert response.json()["detail"] == "send the body as application/json"
    fhir = api.post(
        "/v1/fhir", content=b"<Bundle/>", headers={**auth, "Content-Type": "application/xml"}
    )
    assert fhir.status_code == 415 and fhir.json()["resourceType"] == "OperationOutcome"
    assert "application/fhir+json" in fhir.text  # the FHIR route's own media type is named


def test_a_compressed_body_is_415_naming_the_encoding(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    """gzip was read as it came and answered "not valid JSON: not UTF-8" (422 / 400)."""
    import gzip

    raw = gzip.compress(json.dumps(wdbc_cases(1)).encode())
    for path in ("/v1/cases", "/v1/fhir"):
        ctype = FHIR_JSON if path == "/v1/fhir" else "application/json"
        response = api.post(
            path, content=raw, headers={**auth, "Content-Type": ctype, "Content-Encoding": "gzip"}
        )
        assert response.status_code == 415, response.text
        if path == "/v1/fhir":
            (issue,) = response.json()["issue"]
            assert issue["code"] == "not-supported" and "uncompressed" in issue["diagnostics"]
        else:
            assert (
                response.json()["detail"] == "send the body uncompressed, without Content-Encoding"
            )
    plain = api.post(
        "/v1/cases", json=wdbc_cases(1), headers={**auth, "Content-Encoding": "identity"}
    )
    assert plain.status_code == 202, plain.text
    assert _cases(pg_sessions) == 1


def test_a_key_given_twice_is_refused_where_it_is(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    """{"external_id": "X", "external_id": "Y"} stored Y silently (the last one won); another
    parser may keep the first."""
    raw = json.dumps(wdbc_cases(2))
    twice = raw.replace('"external_id": "wdbc-0001"', '"external_id": "X", "external_id": "Y"')
    response = _json_post(api, "/v1/cases", twice, auth)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", 1, "external_id"] and error["type"] == "duplicate_key"
    canary = "MRN-CANARY7731"
    feature = raw.replace('"mean_area": ', f'"{canary}": 1, "{canary}": 2, "mean_area": ', 1)
    response = _json_post(api, "/v1/cases", feature, auth)
    assert response.status_code == 422 and canary not in response.text
    assert response.json()["detail"][0]["loc"] == ["body", 0, "features", "*"]
    bundle = '{"resourceType": "Bundle", "type": "batch", "type": "transaction", "entry": []}'
    response = _json_post(api, "/v1/fhir", bundle, auth)
    assert response.status_code == 400, response.text
    (issue,) = response.json()["issue"]
    assert issue["code"] == "structure" and issue["expression"] == ["body.type"]
    assert _cases(pg_sessions) == 0


# -- 6. bounded work per request ----------------------------------------------------------------


def test_many_unknown_feature_names_get_a_short_answer(
    api: TestClient, auth: dict[str, str]
) -> None:
    """Thousands of unknown names: counted in one problem, never listed (was a 20 MB 422)."""
    case = wdbc_cases(1)[0]
    extra = {f"CANARY-{i}": 1.0 for i in range(900)}
    response = api.post(
        "/v1/cases", json=[{**case, "features": {**case["features"], **extra}}], headers=auth
    )
    assert response.status_code == 422
    assert len(response.content) < 2_000 and "CANARY" not in response.text
    assert "900 feature name(s) not in the input schema" in response.text
    too_many = {f"CANARY-{i}": 1.0 for i in range(5_000)}
    response = api.post("/v1/cases", json={**case, "features": too_many}, headers=auth)
    assert response.status_code == 422 and len(response.content) < 2_000
    assert response.json()["detail"][0]["loc"] == ["body", "features"]


def test_at_most_n_problems_are_listed_with_the_count_of_all(
    api: TestClient, auth: dict[str, str]
) -> None:
    cases = [{**c, "priority": "urgent"} for c in wdbc_cases(60)]
    response = api.post("/v1/cases", json=cases, headers=auth)
    assert response.status_code == 422
    body = response.json()
    assert len(body["detail"]) == 20 and body["total"] == 60


def test_a_large_bundle_gets_a_bounded_outcome(api: TestClient, auth: dict[str, str]) -> None:
    entry = {"resource": {"resourceType": "Observation", "status": "nonsense"}}
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry] * 2_000}
    response = api.post("/v1/fhir", json=bundle, headers={**auth, "Content-Type": FHIR_JSON})
    assert response.status_code in (400, 422), response.text
    body = response.json()
    assert len(body["issue"]) <= 20 and len(response.content) < 20_000
    if len(body["issue"]) == 20:
        (total,) = body["extension"]
        assert total["url"] == "urn:medbatch:issues-total" and total["valueInteger"] > 20


def _chunks(size: int) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        yield b"[" + b"0," * 4000 + b"0]"
        sent += 8002


def test_an_oversized_chunked_body_is_413_on_every_route(
    api: TestClient, auth: dict[str, str]
) -> None:
    """No Content-Length, 1 MB streamed against a 256 KiB limit (was 400 on genome routes)."""
    paths = api.get("/openapi.json").json()["paths"]
    operations = [(m.upper(), p) for p, item in paths.items() for m in item]
    assert len(operations) >= 19
    for method, template in [*operations, ("GET", "/metrics"), ("GET", "/openapi.json")]:
        path = template.replace("{case_id}", "1").replace("{job_id}", "1")
        path = path.replace("{score_id}", "1").replace("{name}", "x").replace("{version}", "1")
        response = api.request(
            method,
            path,
            content=_chunks(1024 * 1024),
            headers={**auth, "Content-Type": "application/json"},
        )
        assert response.status_code == 413, (method, path, response.text)
        if path.startswith("/v1/fhir"):
            assert response.json()["resourceType"] == "OperationOutcome"


# -- 7. path confinement ------------------------------------------------------------------------


def _genome(api: TestClient, auth: dict[str, str], **body: Any):  # type: ignore[no-untyped-def]
    return api.post("/v1/genome-comparisons", json={"metric": "king", **body}, headers=auth)


@pytest.mark.parametrize(
    "name",
    [".", "./", "../genotypes", "genotypes/..", "..", "/etc/hosts", "sub/../../genotypes", "a\\b"],
)
@pytest.mark.parametrize("field", ["bfile", "vcf", "query"])
def test_names_that_leave_the_folder_are_refused(
    api: TestClient,
    auth: dict[str, str],
    folders: Path,
    pg_sessions: sessionmaker[Session],
    name: str,
    field: str,
) -> None:
    """ "." and "../<folder>" used to read genotypes.bed *beside* the folder."""
    body = {field: name} if field != "query" else {"bfile": "hm3_small", "query": name}
    response = _genome(api, auth, **body)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field] and "genotype folder" in error["msg"]
    assert str(folders) not in response.text
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).select_from(GenomeJob)) == 0


def test_a_per_file_symlink_leaving_the_folder_is_refused(
    api: TestClient, auth: dict[str, str], folders: Path
) -> None:
    """Only the .bed links outside; the prefix itself is inside (was followed)."""
    root = folders / "genotypes"
    (root / "evil.bed").symlink_to(folders / "outside" / "hm3_small.bed")
    for ext in (".bim", ".fam"):
        (root / f"evil{ext}").write_bytes((root / f"hm3_small{ext}").read_bytes())
    (root / "folder-link").symlink_to(folders / "outside")
    for name in ("evil", "folder-link/hm3_small"):
        response = _genome(api, auth, bfile=name)
        assert response.status_code == 422, response.text
        assert "leads outside the folder" in response.text and str(folders) not in response.text


def test_a_symlink_inside_the_folder_is_followed(
    api: TestClient, auth: dict[str, str], folders: Path
) -> None:
    root = folders / "genotypes"
    for ext in (".bed", ".bim", ".fam"):
        (root / f"alias{ext}").symlink_to(root / f"hm3_small{ext}")
    assert _genome(api, auth, bfile="alias").status_code == 202


def test_a_nul_in_a_path_is_refused_and_a_missing_file_is_named_by_field(
    api: TestClient, auth: dict[str, str], folders: Path
) -> None:
    response = _genome(api, auth, bfile="hm3\u0000small")
    assert response.status_code == 422
    response = _genome(api, auth, bfile="missing-CANARY")
    assert response.status_code == 422
    assert "<bfile>.bed not found" in response.text
    assert "CANARY" not in response.text and str(folders) not in response.text


@pytest.mark.parametrize("name", [".", "..", "../genotypes/hm3_small.bed", "/etc/passwd"])
def test_compound_paths_are_refused_with_words_about_the_compound_folder(
    api: TestClient, auth: dict[str, str], name: str
) -> None:
    response = api.post("/v1/compound-similarity", json={"library": name, "top_k": 3}, headers=auth)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "library"] and "compound folder" in error["msg"]
    assert "genotype" not in error["msg"]


def test_a_molecule_file_csv_cannot_split_is_answered_by_record(
    api: TestClient, auth: dict[str, str], folders: Path
) -> None:
    """A SMILES field over csv's 131,072-character limit was a 500 (csv.Error); now that record
    is unreadable and the rest is searched. A header csv cannot read is a 422 naming library."""
    library = folders / "compounds" / "long.csv"
    library.write_text("id,smiles\nethanol,CCO\npolymer," + "C" * 200_000 + "\nphenol,c1ccccc1O\n")
    response = api.post(
        "/v1/compound-similarity", json={"library": "long.csv", "top_k": 1}, headers=auth
    )
    assert response.status_code == 202, response.text
    assert (response.json()["n_library"], response.json()["unreadable"]) == (2, 1)
    library.write_text("smiles" + "x" * 200_000 + "\nCCO\n")
    response = api.post(
        "/v1/compound-similarity", json={"library": "long.csv", "top_k": 1}, headers=auth
    )
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "library"] and "not CSV" in error["msg"]
    assert str(folders) not in response.text


# -- 8. the audit trail fails closed ------------------------------------------------------------


def _scored_patient(sessions: sessionmaker[Session], tenant: str = "hospital") -> None:
    with session_scope(sessions) as s:
        tenant_id = s.scalar(select(repo.Tenant.id).where(repo.Tenant.name == tenant))
        case = wdbc_cases(1)[0]
        (added,) = repo.add_cases(
            s,
            tenant_id=tenant_id,
            cases=[
                repo.NewCase(
                    external_id="e1",
                    model_name="breast-cancer",
                    model_version="1.0.0",
                    priority=Priority.routine,
                    features=case["features"],
                    subject="Patient/p1",
                )
            ],
        )
        repo.save_scores(s, rows=[score_row(added.id, score=0.25, label="benign")])
        repo.mark_done(s, case_ids=[added.id])


def test_a_repeated_query_parameter_is_400_and_audited_as_refused(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    """subject=A&subject=B used to answer for B and audit A."""
    _scored_patient(pg_sessions)
    response = api.get(
        "/v1/fhir/RiskAssessment?subject=Patient/p2&subject=Patient/p1", headers=auth
    )
    assert response.status_code == 400, response.text
    assert "once" in response.text and "RiskAssessment" not in response.text.replace(
        "/v1/fhir/RiskAssessment", ""
    )
    with pg_sessions() as s:
        (event,) = s.scalars(select(AuditEvent)).all()
    assert event.status == 400 and event.outcome == "invalid"


def test_the_audit_row_records_the_subject_answered(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session]
) -> None:
    _scored_patient(pg_sessions)
    response = api.get("/v1/fhir/RiskAssessment", params={"subject": "Patient/p1"}, headers=auth)
    assert response.status_code == 200 and response.json()["total"] == 1
    with pg_sessions() as s:
        (event,) = s.scalars(select(AuditEvent)).all()
    assert event.resource == "subject=Patient/p1" and event.status == 200


@pytest.fixture
def audit_refused(pg_engine) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """A trigger that makes every audit insert fail: the audit store is down."""
    with pg_engine.begin() as conn:
        conn.execute(
            text(
                "CREATE OR REPLACE FUNCTION medbatch_test_refuse() RETURNS trigger AS "
                "$$ BEGIN RAISE EXCEPTION 'audit store down'; END $$ LANGUAGE plpgsql"
            )
        )
        conn.execute(
            text(
                "CREATE TRIGGER medbatch_test_refuse BEFORE INSERT ON audit_events "
                "FOR EACH ROW EXECUTE FUNCTION medbatch_test_refuse()"
            )
        )
    try:
        yield
    finally:
        with pg_engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS medbatch_test_refuse ON audit_events"))
            conn.execute(text("DROP FUNCTION IF EXISTS medbatch_test_refuse()"))


def test_no_data_is_released_when_the_audit_row_cannot_be_written(
    api: TestClient, auth: dict[str, str], pg_sessions: sessionmaker[Session], audit_refused: None
) -> None:
    """Was: 200 with the patient's RiskAssessment and no audit row."""
    _scored_patient(pg_sessions)
    search = api.get("/v1/fhir/RiskAssessment", params={"subject": "Patient/p1"}, headers=auth)
    assert search.status_code == 503, search.text
    assert "RiskAssessment" not in search.text and "0.25" not in search.text
    assert search.json()["resourceType"] == "OperationOutcome"
    with pg_sessions() as s:
        case_id = s.scalar(select(Case.id))
    read = api.get(f"/v1/cases/{case_id}", headers=auth)
    assert read.status_code == 503 and "benign" not in read.text and "e1" not in read.text
    with pg_sessions() as s:
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == 0


# -- 9. error bodies name fields and rules, never the caller's values ---------------------------


def test_error_bodies_do_not_echo_the_callers_values(api: TestClient, auth: dict[str, str]) -> None:
    canary = "CANARY7731"
    case = wdbc_cases(1)[0]
    answers = [
        api.post("/v1/cases", json={**case, "model": canary}, headers=auth),
        api.post("/v1/cases", json={**case, "model": f"breast-cancer@{canary}"}, headers=auth),
        api.post(
            "/v1/cases", json={**case, "features": {**case["features"], canary: 1}}, headers=auth
        ),
        _genome(api, auth, bfile="hm3_small", keep=[canary]),
        api.post(
            "/v1/compound-similarity",
            json={"library": "lib.csv", "top_k": 3, "smiles_column": canary},
            headers=auth,
        ),
        api.post(
            "/v1/compound-similarity",
            json={"library": "lib.csv", "top_k": 3, "id_column": canary},
            headers=auth,
        ),
        api.get(f"/v1/models/{canary}", headers=auth),
        api.get(f"/v1/models/breast-cancer/{canary}/report", headers=auth),
        api.post(
            "/v1/fhir",
            params={"model": canary},
            json={"resourceType": "Bundle", "type": "batch", "entry": []},
            headers={**auth, "Content-Type": FHIR_JSON},
        ),
        api.get("/v1/fhir/RiskAssessment", params={"subject": f"Patient/{canary}!"}, headers=auth),
    ]
    for answer in answers:
        assert 400 <= answer.status_code < 500, answer.text
        assert canary not in answer.text, answer.text


def test_an_unknown_fhir_element_is_located_without_its_name(
    api: TestClient, auth: dict[str, str]
) -> None:
    """{"resourceType": "Patient", "Jane Doe CANARY7731": ...} was answered with the expression
    Bundle.entry[0].resource.Jane Doe CANARY7731. A key shaped like an element name (a misspelt
    "colour") is still named."""
    canary = "Jane Doe CANARY7731"
    patient = {"resourceType": "Patient", "id": "p1", canary: "x"}
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x", "MRN7731": 1, "colour": "blue"},
        "subject": {"reference": "Patient/p1"},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": patient}, {"resource": observation}],
    }
    response = api.post("/v1/fhir", json=bundle, headers={**auth, "Content-Type": FHIR_JSON})
    assert response.status_code == 400, response.text
    assert "7731" not in response.text, response.text
    issues = response.json()["issue"]
    assert [i["expression"] for i in issues] == [
        ["Bundle.entry[0].resource.*"],
        ["Bundle.entry[1].resource.code.*"],
        ["Bundle.entry[1].resource.code.colour"],
    ]
    assert {i["diagnostics"] for i in issues} == {"not an element of this FHIR R4 type"}


def test_a_patient_sent_twice_is_named_by_place_not_by_id(
    api: TestClient, auth: dict[str, str]
) -> None:
    """The refusal said "Patient/MRN-CANARY7731 appears twice"."""
    patient = {"resourceType": "Patient", "id": "MRN-CANARY7731", "gender": "male"}
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": patient}, {"resource": patient}],
    }
    response = api.post("/v1/fhir", json=bundle, headers={**auth, "Content-Type": FHIR_JSON})
    assert response.status_code == 400, response.text
    assert "7731" not in response.text, response.text
    (issue,) = response.json()["issue"]
    assert issue["code"] == "duplicate" and issue["expression"] == ["Bundle.entry[1].resource.id"]


def test_a_malformed_key_is_not_echoed_in_an_error_location(
    api: TestClient, auth: dict[str, str]
) -> None:
    """A feature name or a label's external id the body gets wrong (too long, a control
    character, a label that is not 0 or 1) is located without repeating it: the key is the
    caller's text (a name, an MRN), so the location says '*' where it stood."""
    canary = "CANARY7731"
    case = wdbc_cases(1)[0]
    bad_keys = {canary * 25: 1.0, f"{canary}\t1970": 1.0}
    for key in bad_keys:
        body = {**case, "features": {**case["features"], key: 1.0}}
        for sent in (body, [body]):
            answer = api.post("/v1/cases", json=sent, headers=auth)
            assert answer.status_code == 422, answer.text
            assert canary not in answer.text, answer.text
            assert answer.json()["detail"][0]["loc"][-3:] == ["features", "*", "[key]"]
    answer = api.post(
        "/v1/score-evaluations",
        json={"model": "breast-cancer", "labels": {f"{canary}-1": 2, f"{canary}-2": 0}},
        headers=auth,
    )
    assert answer.status_code == 422, answer.text
    assert canary not in answer.text, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "labels", "*"]


def test_an_event_code_that_does_not_fit_is_not_echoed(
    api: TestClient, auth: dict[str, str]
) -> None:
    """A token model's code list with a value that is not a code in range (a string, a float, an
    integer outside the vocabulary) is named by position and rule, never repeated."""
    for bad in ("CANARY7731", 7731.5, 77317731, -7731):
        case = {"external_id": "ev-1", "model": "events-transformer", "features": {"events": [bad]}}
        answer = api.post("/v1/cases", json=case, headers=auth)
        assert answer.status_code == 422, answer.text
        assert "7731" not in answer.text, answer.text
        problem = answer.json()["detail"][0]
        assert problem["loc"] == ["body", "features", "events"]
        assert problem["msg"].startswith("value 0: ") and "1..1023" in problem["msg"]
