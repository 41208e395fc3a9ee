"""The real server sees the real client (issue 11, part 2): with
--forward_client_address perdition tells Dovecot the client's address by
IMAP ID and POP3 XCLIENT, which Dovecot takes from its
login_trusted_networks and logs as rip=; a hop count stops two proxies
that send a login round in a circle.
"""

import pytest

from dovecot import Dovecot
from helpers import Perdition, RawClient, TIMEOUT, wait_until
from support import log_in_and_out

CLIENT = "127.0.0.5"


@pytest.fixture(scope="module")
def trusting(tmp_path_factory):
    """A Dovecot that takes the client's address from proxies on
    127.0.0.0/8."""
    with Dovecot(tmp_path_factory.mktemp("trusting"),
                 extra="login_trusted_networks = 127.0.0.0/8\n") as server:
        yield server


def log_in(port, protocol, source=None):
    """Log in as alice; return perdition's answer to the login."""
    with RawClient(port, source=source) as client:
        client.readline()
        return log_in_and_out(client, protocol)


def dovecot_login_line(dovecot, protocol, count):
    """Dovecot's count-th "Login:" line of alice for the protocol."""
    service = "imap-login" if protocol == "IMAP4" else "pop3-login"
    lines = []

    def logged():
        lines[:] = [line for line in dovecot.log().splitlines()
                    if service + ": Info: Login: user=<alice>" in line]
        return len(lines) >= count
    wait_until(logged, timeout=TIMEOUT, what="Dovecot's login line")
    return lines[count - 1]


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_dovecot_logs_the_real_client(trusting, perdition_factory, protocol):
    port = trusting.imap_port if protocol == "IMAP4" else trusting.pop3_port
    count = 0
    for forward, rip in ((True, CLIENT), (False, "127.0.0.1")):
        proxy = perdition_factory(["--forward_client_address"] if forward
                                  else [], protocol, port)
        assert b"OK" in log_in(proxy.port, protocol, (CLIENT, 0))
        count += 1
        line = dovecot_login_line(trusting, protocol, count)
        assert "rip=%s," % rip in line, line
        assert "lip=127.0.0.1," in line


def test_a_proxy_loop_is_stopped_by_the_hop_count(tmp_path):
    """perdition A sends every login to B and B to A.  The greetings
    differ (-B), so the greeting check cannot tell; the hop count can."""
    for protocol in ("IMAP4", "POP3"):
        a = Perdition(["--forward_client_address"], protocol, tmp_path)
        b = Perdition(["--forward_client_address", "-B", "-M", "",
                       "-s", "127.0.0.1:%d" % a.port], protocol, tmp_path)
        a.args += ["-M", "", "-s", "127.0.0.1:%d" % b.port]
        with a, b:
            assert b"OK" not in log_in(a.port, protocol)
            log = a.wait_for_log("status=failed: Proxy loop: no hops left "
                                 "(x-proxy-ttl/TTL 1)")
            assert "Re-Authentication" not in log + b.log()
            # A, B, A, B: four hops passed it on, the fifth refused.
            assert log.count("Connect: ") + b.log().count("Connect: ") \
                >= 5


@pytest.mark.parametrize("protocol, command", [
    ("IMAP4", b'a ID ("x-proxy-ttl" "1")\r\n'),
    ("POP3", b"XCLIENT ADDR=192.0.2.1 TTL=1\r\n"),
])
def test_a_hop_count_from_a_proxy_in_front_is_honoured(
        dovecot, perdition_factory, protocol, command):
    proxy = perdition_factory(["--forward_client_address"], protocol,
                              dovecot.imap_port if protocol == "IMAP4"
                              else dovecot.pop3_port)
    with RawClient(proxy.port) as client:
        client.readline()
        client.send(command)
        client.read_until(b"OK")
        client.read_until(b"\n")
        if protocol == "IMAP4":
            client.send(b"b LOGIN alice alicepw\r\n")
            assert client.readline() == b"b NO Too many proxy hops\r\n"
        else:
            client.send(b"USER alice\r\nPASS alicepw\r\n")
            client.readline()
            assert client.readline() == b"-ERR Too many proxy hops\r\n"
    log = proxy.wait_for_log("status=failed: Proxy loop")
    # XCLIENT's address is not taken from a client.
    assert "192.0.2.1" not in log.split("Starting:")[-1].split("\n", 1)[1]


def test_xclient_exists_only_with_forwarding(dovecot, perdition_factory):
    proxy = perdition_factory([], "POP3", dovecot.pop3_port)
    with RawClient(proxy.port) as client:
        client.readline()
        client.send(b"XCLIENT TTL=1\r\n")
        answer = client.readline()
        assert answer.startswith(b"-ERR Unknown command, expected ")
        assert b"XCLIENT" not in answer
        client.send(b"CAPA\r\n")
        assert b"XCLIENT" not in client.read_until(b"\r\n.\r\n")
