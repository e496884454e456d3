"""The server's HTTP socket is bound before the engine loads, and a taken port is a clear error at once."""

from __future__ import annotations

import socket

import pytest

from serve.main import bind_listener


def test_the_socket_listens_on_the_port_asked_for() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with bind_listener("127.0.0.1", port) as listener:
        assert listener.getsockname() == ("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # accepted into the backlog: it listens before uvicorn takes it over


def test_a_taken_port_stops_the_server_with_what_to_change() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port} .*set RANKLOOP_PORT"):
            bind_listener("127.0.0.1", port)
