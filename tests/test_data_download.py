"""`download=True` against a real HTTP server on loopback: files fetched, checksums
verified, a corrupted download rejected and not left behind."""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.data_factories import make_kdd, make_mnist
from training.data import DataError, load_splits
from training.data import download as dl


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (base_url, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GANSENTRY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(dl.BASE_URL_ENV, raising=False)


def _published(monkeypatch, dataset: str, folder: Path, algo: str = "md5") -> None:
    """Point the checksum table at the generated files, as the real table points at the
    published ones."""
    remotes = [
        dl.Remote(p.name, **{algo: hashlib.new(algo, p.read_bytes()).hexdigest()})
        for p in sorted(folder.iterdir())
    ]
    monkeypatch.setitem(dl.FILES, dataset, remotes)


def test_download_fetches_verifies_and_loads(tmp_path, server, monkeypatch):
    base, www = server
    make_mnist(www, n_train=60, n_test=20)
    _published(monkeypatch, "mnist", www / "mnist")
    data = tmp_path / "data"
    with pytest.raises(DataError, match="not found"):
        load_splits("mnist", normal_class=0, root=data)
    s = load_splits("mnist", normal_class=0, root=data, download=True, download_base_url=base)
    assert len(s.test) == 20
    for remote in dl.FILES["mnist"]:
        fetched = (data / "mnist" / remote.name).read_bytes()
        assert fetched == (www / "mnist" / remote.name).read_bytes()
    assert not list((data / "mnist").glob(".*"))  # no temp files left


def test_download_base_url_from_environment_and_sha256(tmp_path, server, monkeypatch):
    base, www = server
    make_kdd(www / "kddcup99" / "kddcup.data_10_percent.gz", n=200)
    _published(monkeypatch, "kddcup99", www / "kddcup99", algo="sha256")
    monkeypatch.setenv(dl.BASE_URL_ENV, base + "/")
    s = load_splits("kddcup99", root=tmp_path / "data", download=True)
    assert s.train.shape[1] == 121


def test_corrupted_download_is_rejected_and_removed(tmp_path, server, monkeypatch):
    base, www = server
    make_mnist(www, n_train=60, n_test=20)
    _published(monkeypatch, "mnist", www / "mnist")
    victim = www / "mnist" / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    data = tmp_path / "data"
    with pytest.raises(
        DataError, match=r"t10k-images-idx3-ubyte\.gz: checksum mismatch: md5 [0-9a-f]{32}"
    ):
        load_splits("mnist", normal_class=0, root=data, download=True, download_base_url=base)
    left = sorted(p.name for p in (data / "mnist").iterdir())
    assert "t10k-images-idx3-ubyte.gz" not in left
    assert not [n for n in left if n.startswith(".")]


def test_unreachable_file_is_a_data_error(tmp_path, server, monkeypatch):
    base, _ = server
    monkeypatch.setitem(dl.FILES, "cifar10", [dl.Remote("cifar-10-python.tar.gz", md5="0" * 32)])
    with pytest.raises(DataError, match=r"cannot download cifar-10-python\.tar\.gz:.*404"):
        load_splits("cifar10", normal_class=0, root=tmp_path, download=True, download_base_url=base)
    assert not list((tmp_path / "cifar10").iterdir())


def test_checksum_table_covers_every_named_dataset():
    from training.data import DATASETS

    assert set(dl.FILES) == set(DATASETS) == set(dl.BASE_URLS)
    assert dl.FILES["cifar10"][0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert all(r.md5 or r.sha256 for rs in dl.FILES.values() for r in rs)
    assert all(b.startswith("http") for bs in dl.BASE_URLS.values() for b in bs)
