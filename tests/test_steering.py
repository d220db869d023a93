"""The customers' accept queue: the kernel sends known networks' connections past the bots'."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mailfence.defense.net import IPNetwork
from mailfence.smtp import steering
from mailfence.smtp.door import ACCEPT_BATCH, open_listening_sockets

from .conftest import StartRelay
from .test_defense_e2e import send_as_alice


def networks(*texts: str) -> list[IPNetwork]:
    return [ipaddress.ip_network(text) for text in texts]


@contextlib.contextmanager
def pair(host: str = "127.0.0.1") -> Iterator[tuple[socket.socket, socket.socket]]:
    [(common, customers)] = open_listening_sockets(host, 0, backlog=64, customers_queue=True)
    try:
        assert customers is not None
        yield common, customers
    finally:
        common.close()
        if customers is not None:
            customers.close()


def queue_of(
    common: socket.socket, customers: socket.socket, source: str, family: int = socket.AF_INET
) -> str:
    """Connects from `source` and says which queue the connection landed in."""
    with socket.socket(family) as client:
        client.bind((source, 0))
        client.connect(common.getsockname()[:2])
        ready, _, _ = select.select([common, customers], [], [], 5)
        assert len(ready) == 1, ready
        connection, _ = ready[0].accept()
        connection.close()
        return "customers" if ready[0] is customers else "common"


def test_known_networks_land_in_the_customers_queue_and_the_rest_in_the_common_one() -> None:
    with pair() as (common, customers):
        # No program yet, as when the relay starts: everything in the common queue.
        steering.attach(common, steering.program(socket.AF_INET, [])[0])
        assert queue_of(common, customers, "127.10.0.5") == "common"
        code, held = steering.program(
            socket.AF_INET, networks("127.10.0.0/24", "127.66.5.7/32", "::/64", "127.66.5.7/32")
        )
        assert held == 2  # the IPv6 network is for the IPv6 sockets; the repeat is dropped
        steering.attach(customers, code)  # any socket of the group takes it
        assert queue_of(common, customers, "127.10.0.5") == "customers"
        assert queue_of(common, customers, "127.10.0.250") == "customers"
        assert queue_of(common, customers, "127.66.5.7") == "customers"
        assert queue_of(common, customers, "127.66.5.8") == "common"
        assert queue_of(common, customers, "127.10.1.5") == "common"
        steering.attach(common, steering.program(socket.AF_INET, networks("0.0.0.0/0"))[0])
        assert queue_of(common, customers, "127.99.0.1") == "customers"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_sources_are_matched_on_all_128_bits() -> None:
    with pair("::1") as (common, customers):
        for steered, expected in (
            (networks("::/64"), "customers"),
            (networks("::1/128"), "customers"),
            (networks("::2/128", "127.0.0.0/8"), "common"),
            (networks("0:0:0:1::/64"), "common"),
            (networks("::/0"), "customers"),
        ):
            steering.attach(common, steering.program(socket.AF_INET6, steered)[0])
            assert queue_of(common, customers, "::1", socket.AF_INET6) == expected, steered


def test_networks_of_one_word_share_a_load_and_many_fit() -> None:
    many = [ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(3000)]
    with pair() as (common, customers):
        code, held = steering.program(socket.AF_INET, [*many, *networks("127.64.0.0/12")])
        assert held == 3001 and len(code) // 8 <= steering.MAX_INSTRUCTIONS
        assert steering.install(common, many + networks("127.64.0.0/12")) == 3001
        assert queue_of(common, customers, "127.70.1.1") == "customers"  # in the /12
        assert queue_of(common, customers, "127.80.0.1") == "common"
        code, held = steering.program(socket.AF_INET, many, limit=10)
        assert held == 10
        too_many = [
            ipaddress.ip_network(f"10.{i // 256}.{i % 256}.{i % 7}/32") for i in range(9000)
        ]
        code, held = steering.program(socket.AF_INET, too_many)
        assert 3000 < held < len(too_many) and len(code) // 8 <= steering.MAX_INSTRUCTIONS


INSTALL_IN_A_SMALL_NAMESPACE = """
import ipaddress, socket, sys
from mailfence.smtp import steering
from mailfence.smtp.door import open_listening_sockets
family, networks = (
    (socket.AF_INET, [ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(3000)])
    if sys.argv[1] == "4"
    else (socket.AF_INET6, [ipaddress.ip_network(f"2001:db8::{i:x}/128") for i in range(3000)])
)
[(common, customers)] = open_listening_sockets(sys.argv[2], 0, 64, customers_queue=True)
print(steering.install(common, networks))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs root, unshare and ip to make a network namespace with a small optmem_max",
)
@pytest.mark.parametrize(("version", "host"), [("4", "127.0.0.1"), ("6", "::1")])
def test_a_kernel_short_of_memory_gets_a_program_with_fewer_networks(
    version: str, host: str
) -> None:
    """Kernels before 6.9 allow a socket 20 KiB of options (net.core.optmem_max): less than
    a full program. Run in a network namespace of its own, with that limit."""
    script = (
        "ip link set lo up && echo 20480 > /proc/sys/net/core/optmem_max && "
        f'exec {sys.executable} -c "$0" {version} {host}'
    )
    unshare = shutil.which("unshare")
    assert unshare is not None
    result = subprocess.run(
        [unshare, "--net", "sh", "-c", script, INSTALL_IN_A_SMALL_NAMESPACE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "Operation not permitted" in result.stderr:
        # The limit must be lowered for this test alone, never for the whole machine.
        pytest.skip(
            "this machine does not let root make a network namespace, where a kernel's 20 KiB"
            f" optmem_max could be set for this test alone ({result.stderr.strip()})"
        )
    assert result.returncode == 0, result.stderr
    held = int(result.stdout)
    assert 0 < held < 3000


def test_a_port_someone_listens_on_is_refused_not_shared() -> None:
    """SO_REUSEPORT would let two relays share a port and split its mail between them."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        port = other.getsockname()[1]
        with pytest.raises(OSError) as raised:
            open_listening_sockets("127.0.0.1", port, backlog=8, customers_queue=True)
        assert raised.value.errno == errno.EADDRINUSE
    [(common, customers)] = open_listening_sockets("127.0.0.1", port, 8, customers_queue=True)
    try:
        with pytest.raises(OSError) as raised:
            open_listening_sockets("127.0.0.1", port, backlog=8, customers_queue=True)
        assert raised.value.errno == errno.EADDRINUSE
    finally:
        common.close()
        assert customers is not None
        customers.close()


def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_customer_is_accepted_ahead_of_a_queue_of_strangers(start_relay: StartRelay) -> None:
    # The relay's own door on both queues: the strangers' door process would refuse most of
    # the strangers before the relay sees them, and this is about the relay's order.
    relay = start_relay(defense={"door_process": False})
    listeners = relay.server.listeners
    order: list[str] = []
    accepted = listeners.accepted

    def recording(
        listener: Any, connection: socket.socket, peer: Any, strangers_checked: bool = False
    ) -> None:
        order.append(peer[0])
        accepted(listener, connection, peer, strangers_checked)

    listeners.accepted = recording  # type: ignore[method-assign]
    # A first login from 127.20.0.5 makes its /24 known: within a second (housekeeping) its
    # connections go to the customers' queue.
    assert send_as_alice(relay, "127.20.0.5") == 250
    wait_for(lambda: ipaddress.ip_network("127.20.0.0/24") in listeners.steered_networks)
    before = listeners.accepted_from["customers"]
    assert send_as_alice(relay, "127.20.0.9") == 250
    assert listeners.accepted_from["customers"] == before + 1

    # Hold the event loop while 150 strangers and then the customer connect: the kernel
    # completes them all into the backlogs. When the loop runs again, the customer's
    # connection must be among the first accepted, not behind the 150.
    blocked, release = threading.Event(), threading.Event()

    def hold() -> None:
        blocked.set()
        release.wait(10)

    relay.call(hold)
    assert blocked.wait(10)
    strangers: list[socket.socket] = []
    try:
        for n in range(150):
            sock = socket.socket()
            strangers.append(sock)
            sock.bind((f"127.30.{n // 100}.{n % 100 + 1}", 0))
            sock.connect(("127.0.0.1", relay.starttls_port))
        order.clear()
        customer = socket.create_connection(
            ("127.0.0.1", relay.starttls_port), timeout=10, source_address=("127.20.0.7", 0)
        )
        release.set()
        with customer:
            assert customer.recv(1024).startswith(b"220")
        assert "127.20.0.7" in order[: ACCEPT_BATCH + 1], order.index("127.20.0.7")
    finally:
        release.set()
        for sock in strangers:
            sock.close()
