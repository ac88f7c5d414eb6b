"""The tests keep to this machine and to their own folders: the guard in conftest.py refuses
connections to any host but this one before a packet is sent (the workbench then answers as it
does offline), and models are built in the session's own cache, whatever the user's shell says."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

import conftest
from conftest import NetworkBlocked, is_local

# example.com's address: public, and never reached here.
PUBLIC = ("93.184.216.34", 80)


@pytest.fixture
def real_calls(monkeypatch) -> list:
    """The connections that got past the guard to the real socket calls (which still run)."""
    calls = []
    for name, real in conftest._REAL.items():
        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setitem(conftest._REAL, name, spy)
    return calls


@pytest.fixture
def server():
    """A TCP server on 127.0.0.1 that accepts one connection at a time."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def test_a_public_address_is_refused_before_any_real_attempt(real_calls,
                                                             blocked_connections):
    with pytest.raises(NetworkBlocked, match=r"93\.184\.216\.34:80 was blocked"):
        socket.create_connection(PUBLIC, timeout=1)
    with socket.socket() as sock, pytest.raises(NetworkBlocked):
        sock.connect(PUBLIC)
    with socket.socket() as sock, pytest.raises(NetworkBlocked):
        sock.connect_ex(PUBLIC)
    with pytest.raises(NetworkBlocked):  # a name is refused before it is looked up
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert real_calls == []
    assert blocked_connections() == ["93.184.216.34:80"] * 3 + ["huggingface.co:443"]


def test_loopback_and_unix_sockets_still_connect(real_calls, server, tmp_path):
    for host in ("127.0.0.1", "localhost"):
        socket.create_connection((host, server), timeout=5).close()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", server)) == 0
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "s"))
    unix.listen()
    with unix, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(tmp_path / "s"))
    assert real_calls.count("create_connection") == 2 and real_calls.count("connect_ex") == 1


def test_a_test_that_carries_on_after_the_refusal_still_fails(pytester):
    pytester.makeconftest(Path(conftest.__file__).read_text())
    pytester.makepyfile(test_quiet="""
        import socket

        def test_quiet():
            try:
                socket.create_connection(("93.184.216.34", 80), timeout=1)
            except OSError:
                pass  # as code that falls back to a cache when offline does
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*test_quiet tried to use the network: 93.184.216.34:80*"])


def test_what_counts_as_this_machine():
    assert all(map(is_local, ["127.0.0.1", "127.8.9.10", "::1", "localhost", "::ffff:127.0.0.1",
                              "0.0.0.0", b"127.0.0.1"]))
    assert not any(map(is_local, ["93.184.216.34", "10.0.0.1", "2606:4700::1", "example.com",
                                  "::ffff:93.184.216.34"]))


def test_the_hub_check_answers_false_under_the_guard(monkeypatch, blocked_connections):
    # Imported while the offline switch is on: huggingface_hub reads it once, at import, and
    # every later test must find the hub client offline.
    from huggingface_hub import constants

    from headshot_kit import models

    assert constants.HF_HUB_OFFLINE
    # The guard alone, not the offline switch every test runs under, makes it answer False.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert models.hub_reachable(timeout=1) is False
    assert [a.split(":")[0] for a in blocked_connections()] == ["huggingface.co"]


def test_models_are_built_in_the_sessions_own_cache(tmp_path_factory):
    from headshot_kit import models

    # Even when the user's shell exports HEADSHOT_KIT_CACHE.
    assert models.cache_dir().is_relative_to(tmp_path_factory.getbasetemp())
