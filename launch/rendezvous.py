"""Network checks made before any process starts: is an address ours, does an endpoint answer."""

from __future__ import annotations

import socket
import time

from common.typed_config import ConfigError


def resolve(host: str, key: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as err:
        raise ConfigError(f"{key}: cannot resolve host {host!r} ({err.strerror})") from None
    return sorted({info[4][0] for info in infos})


def is_local_address(host: str, key: str) -> bool:
    """True when `host` names an address of this machine (a socket can bind to it)."""
    for address in resolve(host, key):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, 0))
                return True
            except OSError:
                continue
    return False


def route_address(host: str, port: int, key: str) -> str:
    """The address of this machine that packets to `host` leave from (no packet is sent)."""
    address = resolve(host, key)[0]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((address, port))
        except OSError as err:
            raise ConfigError(f"{key}={host}:{port}: no route to host ({err.strerror})") from None
        return sock.getsockname()[0]


def wait_for_endpoint(host: str, port: int, seconds: float, key: str) -> None:
    """Waits until something accepts TCP connections at host:port, for at most `seconds`.

    The first node's rendezvous store may still be starting, so a refused
    connection is retried; what never answers is bad input, reported before
    this node starts workers that would wait for their peers until a timeout.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(seconds, 0.1))):
                return
        except OSError as err:
            reason = err.strerror or type(err).__name__
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"{key}={host}:{port}: nothing accepts TCP connections there after {seconds:g} s "
                f"({reason}); expected the first node's rendezvous to be listening"
            )
        time.sleep(0.5)
