"""`up` refuses a port something listens on, not one a server stopped a moment ago left in TIME_WAIT."""

from __future__ import annotations

import socket

from serving.stack import free_port, port_taken


def test_a_listening_port_is_taken_and_its_time_wait_is_not() -> None:
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    assert port_taken(port)
    accepted.close()  # the server closes first: its side of the connection waits in TIME_WAIT
    client.close()
    server.close()
    assert not port_taken(port)  # a restart right after Ctrl-C must be able to bind it
