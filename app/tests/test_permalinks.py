"""The permalink service answers as SageMathCell does, and keeps every permalink it acknowledged."""

from __future__ import annotations

import json
import re
import zlib
from base64 import urlsafe_b64decode
from pathlib import Path

from cellserver.permalinks import SQLiteStore, unzip_text, zip_text
from conftest import Postgres, Service, free_port

CODE = "print(1 + 1)\n# é ünïcode ✓"


def test_round_trip_matches_upstream_fields(service: Service) -> None:
    status, headers, body = service.request(
        "POST", "/permalink", {"code": CODE, "language": "python", "interacts": "[1]"}
    )
    assert status == 200
    answer = json.loads(body)
    assert set(answer) == {"query", "zip", "interacts"}
    assert re.fullmatch(r"[a-z]{6}", answer["query"])
    assert zlib.decompress(urlsafe_b64decode(answer["zip"])).decode() == CODE
    assert unzip_text(answer["interacts"]) == "[1]"
    assert headers["Access-Control-Allow-Origin"] == "*"
    status, headers, body = service.request("GET", f"/permalink?q={answer['query']}")
    assert status == 200 and json.loads(body) == [CODE, "python", "[1]"]
    assert headers["Content-Type"].startswith("application/json")


def test_language_and_interacts_default_as_upstream(service: Service) -> None:
    ident = json.loads(service.request("POST", "/", {"code": "1"})[2])["query"]
    assert json.loads(service.request("GET", f"/?q={ident}")[2]) == ["1", "sage", "[]"]


def test_jsonp_hands_the_callback_the_json_text(service: Service) -> None:
    ident = json.loads(service.request("POST", "/permalink", {"code": CODE})[2])["query"]
    status, headers, body = service.request("GET", f"/permalink?q={ident}&callback=cell.load")
    assert status == 200 and headers["Content-Type"].startswith("application/javascript")
    match = re.fullmatch(r"cell\.load\((.*)\);", body, re.DOTALL)
    assert match is not None
    assert json.loads(json.loads(match.group(1))) == [CODE, "sage", "[]"]


def test_frame_answers_with_a_postmessage_script(service: Service) -> None:
    status, headers, body = service.request("POST", "/permalink", {"code": "x", "frame": "1"})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert body.startswith("<script>parent.postMessage(") and body.endswith(',"*");</script>')


def test_bad_requests_get_a_json_error_and_store_nothing(service: Service) -> None:
    for method, path, fields, expected in [
        ("POST", "/permalink", {"language": "sage"}, 400),
        ("POST", "/permalink", {"code": "x" * 65_001}, 413),
        ("POST", "/permalink", {"code": "1", "n": "two"}, 400),
        ("GET", "/permalink", None, 400),
        ("GET", "/permalink?q=abcdef&callback=alert(1)//", None, 400),
        ("GET", "/permalink?q=zzzzzz", None, 404),
        ("GET", "/permalink?q=../etc", None, 404),  # upstream looks up ids of any shape
        ("GET", "/permalink?q=" + "a" * 500, None, 404),
    ]:
        status, headers, body = service.request(method, path, fields)
        assert status == expected, (path, body)
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["status"] == expected


def test_zip_tolerates_dropped_padding() -> None:
    for text in ("a", "ab", "abc", CODE):
        assert unzip_text(zip_text(text).rstrip("=")) == text


def make_permalinks(service: Service, count: int) -> dict[str, str]:
    """count acknowledged permalinks: id -> code."""
    idents = {}
    for number in range(count):
        status, _headers, body = service.request("POST", "/permalink", {"code": f"print({number})"})
        assert status == 200
        idents[json.loads(body)["query"]] = f"print({number})"
    return idents


def assert_every_permalink_reads_back(service: Service, idents: dict[str, str]) -> None:
    for ident, code in idents.items():
        status, _headers, body = service.request("GET", f"/permalink?q={ident}")
        assert status == 200 and json.loads(body)[0] == code


def test_acknowledged_permalinks_survive_kill_9(service: Service) -> None:
    idents = make_permalinks(service, 40)
    service.kill_hard()
    service.start()
    assert_every_permalink_reads_back(service, idents)


def test_acknowledged_permalinks_survive_kill_9_of_postgresql(postgres: Postgres, tmp_path: Path) -> None:
    service = Service(port=free_port(), database=tmp_path / "unused", arguments=("permalink", "--postgres",
                      postgres.conninfo))  # fmt: skip
    service.start()
    try:
        idents = make_permalinks(service, 40)
        postgres.kill_hard()
        postgres.start()
        # The service was not restarted: it reconnects on its own.
        assert_every_permalink_reads_back(service, idents)
    finally:
        service.stop()


def test_a_database_that_is_down_gets_503_to_retry_not_a_server_error(postgres: Postgres, tmp_path: Path) -> None:
    service = Service(port=free_port(), database=tmp_path / "unused", arguments=("permalink", "--postgres",
                      postgres.conninfo))  # fmt: skip
    service.start()
    try:
        [ident] = make_permalinks(service, 1)
        postgres.stop()
        try:
            for method, path, fields in [("POST", "/permalink", {"code": "1"}), ("GET", f"/permalink?q={ident}", None)]:
                status, headers, body = service.request(method, path, fields)
                assert status == 503, (method, body)
                assert headers["Retry-After"] == "5"
                assert json.loads(body)["status"] == 503
                assert "unavailable" in json.loads(body)["error"]
        finally:
            postgres.start()
        assert_every_permalink_reads_back(service, make_permalinks(service, 1) | {ident: "print(0)"})
    finally:
        service.stop()


def test_health_reads_the_store(service: Service) -> None:
    status, headers, body = service.request("GET", "/health")
    assert status == 200 and json.loads(body) == {"healthy": True}
    assert headers["Cache-Control"] == "no-store"


def test_n_is_echoed_as_upstreams_page_needs(service: Service) -> None:
    # Upstream's page sends n with each permalink request and ignores an answer whose n is not its last one.
    for sent in ("1", "17"):
        answer = json.loads(service.request("POST", "/permalink", {"code": "1", "n": sent})[2])
        assert answer["n"] == int(sent)


def test_a_credentialed_page_gets_its_origin_back(service: Service) -> None:
    origin = "http://course.example:8000"
    for method, path, fields in [("POST", "/permalink", {"code": "1"}), ("GET", "/permalink?q=zzzzzz", None)]:
        _status, headers, _body = service.request(method, path, fields, headers={"Origin": origin})
        assert headers["Access-Control-Allow-Origin"] == origin, path
        assert headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in headers["Vary"]


def test_ids_made_by_an_older_store_still_resolve(tmp_path: Path) -> None:
    # Upstream's ids were uuids once: a database imported from it keeps them, and links with them must open.
    database = tmp_path / "permalinks.sqlite3"
    ident = "0b6e4a8c-1d2f-4e5a-9b7c-3d2e1f0a9b8c"
    store = SQLiteStore(database)
    store._connection.execute(
        "INSERT INTO permalinks (ident, code, language, interacts) VALUES (?, ?, ?, ?)", (ident, "2 + 2", "sage", "[]")
    )
    store.close()
    service = Service(port=free_port(), database=database, arguments=("permalink", "--db", str(database)))
    service.start()
    try:
        status, _headers, body = service.request("GET", f"/permalink?q={ident}")
    finally:
        service.stop()
    assert status == 200 and json.loads(body) == ["2 + 2", "sage", "[]"]


def test_only_the_allowed_origins_get_credentials(tmp_path: Path) -> None:
    database = tmp_path / "permalinks.sqlite3"
    arguments = ("permalink", "--db", str(database), "--allowed-origins", "https://course.example https://b.example")
    service = Service(port=free_port(), database=database, arguments=arguments)
    service.start()
    try:
        allowed = service.request("POST", "/permalink", {"code": "1"}, headers={"Origin": "https://b.example"})[1]
        other = service.request("POST", "/permalink", {"code": "1"}, headers={"Origin": "https://evil.example"})[1]
    finally:
        service.stop()
    assert allowed["Access-Control-Allow-Origin"] == "https://b.example"
    assert "Access-Control-Allow-Origin" not in other and "Access-Control-Allow-Credentials" not in other
