"""Ports for the local SeaweedFS server: `weed mini` also serves gRPC on every HTTP port + 10000."""

from __future__ import annotations

import socket

from audiopipe.infra.store import GRPC_PORT_OFFSET, PORT_RANGE, free_port


def test_free_ports_leave_room_for_their_grpc_twins_and_never_collide():
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)
    assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports)
    twins = {p + GRPC_PORT_OFFSET for p in ports}
    assert not twins & set(ports)  # the CI failure: a master port equal to another port's gRPC twin
    for port in ports[:5]:  # both really bindable right after being handed out
        for candidate in (port, port + GRPC_PORT_OFFSET):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", candidate))


def test_a_taken_twin_is_skipped(monkeypatch):
    import audiopipe.infra.store as store

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    blocked_twin = taken.getsockname()[1]
    draws = iter([blocked_twin - GRPC_PORT_OFFSET, 21234])
    monkeypatch.setattr(store, "_handed_out", set())

    class Draws:
        def randrange(self, *_):
            return next(draws)

    monkeypatch.setattr(store.random, "SystemRandom", Draws)
    try:
        assert free_port() == 21234
    finally:
        taken.close()
