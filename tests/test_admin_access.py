"""Admin access over real HTTP (`gansentry serve` subprocesses): `/admin/*` takes only
admin keys (GANSENTRY_ADMIN_KEYS / _FILE), never the scoring keys, and without admin keys
it answers only to loopback clients."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests.fixtures_models import IMAGE_MODEL, ModelRepo
from tests.fixtures_redis import ApiProcess

GOOD = {"model": IMAGE_MODEL, "inputs": [{"array": [[[0.5] * 32] * 32]}]}


def outward_address() -> str | None:
    """This host's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.fixture(scope="module")
def open_api(model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory):
    """No keys at all, listening on every interface."""
    api = ApiProcess(model_repo.root, tmp_path_factory.mktemp("admin-open"), host="0.0.0.0")
    api.wait_up()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def keyed_api(model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("admin-keyed")
    (root / "admin-keys").write_text("file-admin\n\n")
    api = ApiProcess(
        model_repo.root,
        root,
        api_keys="score-key",
        admin_keys="admin-1, admin-2",
        admin_keys_file=root / "admin-keys",
    )
    api.wait_up()
    yield api
    api.stop()


def test_without_admin_keys_only_loopback_clients_may_reload(open_api: ApiProcess) -> None:
    r = httpx.post(f"{open_api.url}/admin/reload")
    assert r.status_code == 200, r.text
    assert f"{IMAGE_MODEL}:2" in r.json()["loaded"]
    # A reverse proxy on this host forwarding a remote client: uvicorn trusts loopback
    # proxies, so the client's own address is the one checked.
    r = httpx.post(f"{open_api.url}/admin/reload", headers={"X-Forwarded-For": "203.0.113.7"})
    assert r.status_code == 403
    detail = r.json()["detail"]
    assert "only to loopback clients" in detail and "203.0.113.7" in detail
    assert "GANSENTRY_ADMIN_KEYS" in detail
    # Scoring stays open to everyone (no API keys set).
    assert httpx.post(f"{open_api.url}/score", json=GOOD).status_code == 200


def test_without_admin_keys_a_client_on_another_address_is_refused(open_api: ApiProcess) -> None:
    address = outward_address()
    if address is None:
        pytest.skip("this host has no non-loopback address to connect from")
    url = f"http://{address}:{open_api.port}"
    r = httpx.post(f"{url}/admin/reload")
    assert r.status_code == 403, r.text
    assert address in r.json()["detail"]
    assert httpx.post(f"{url}/score", json=GOOD).status_code == 200


def test_admin_keys_and_scoring_keys_are_separate(keyed_api: ApiProcess) -> None:
    url = keyed_api.url
    r = httpx.post(f"{url}/admin/reload")
    assert r.status_code == 401
    assert r.json()["detail"] == (
        "admin endpoints need an admin key in X-API-Key (GANSENTRY_ADMIN_KEYS)"
    )
    r = httpx.post(f"{url}/admin/reload", headers={"X-API-Key": "score-key"})
    assert r.status_code == 401
    assert "not an admin key; scoring keys do not open admin endpoints" in r.json()["detail"]
    for key in ("admin-1", "admin-2", "file-admin"):
        r = httpx.post(f"{url}/admin/reload", headers={"X-API-Key": key})
        assert r.status_code == 200, (key, r.text)
    # With admin keys, the address does not matter: a forwarded remote client with a key
    # gets in, one without is refused.
    remote = {"X-Forwarded-For": "203.0.113.7"}
    r = httpx.post(f"{url}/admin/reload", headers={**remote, "X-API-Key": "admin-1"})
    assert r.status_code == 200
    assert httpx.post(f"{url}/admin/reload", headers=remote).status_code == 401
    # An admin key is not a scoring key.
    assert (
        httpx.post(f"{url}/score", json=GOOD, headers={"X-API-Key": "admin-1"}).status_code == 401
    )
    assert (
        httpx.post(f"{url}/score", json=GOOD, headers={"X-API-Key": "score-key"}).status_code == 200
    )


def test_an_unreadable_admin_keys_file_stops_start_up(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    api = ApiProcess(model_repo.root, tmp_path, admin_keys_file=tmp_path / "missing")
    try:
        assert api.process.wait(60) != 0
    finally:
        api.stop()
    assert "cannot read a keys file" in api.log.read_text()
