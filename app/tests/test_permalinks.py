"""The permalink service answers as SageMathCell does, and keeps every permalink it acknowledged."""

from __future__ import annotations

import json
import re
import zlib
from base64 import urlsafe_b64decode
from pathlib import Path

from cellserver.permalinks import unzip_text, zip_text
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
        ("GET", "/permalink?q=../etc", None, 400),
        ("GET", "/permalink?q=abcdef&callback=alert(1)//", None, 400),
        ("GET", "/permalink?q=zzzzzz", None, 404),
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
