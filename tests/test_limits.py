"""Brute force and slow clients (issue 11, parts 4 and 5): the delay
after a failed login, the limit on failed logins per client address, the
login timeout that a trickling client cannot stretch, and the limit on
connections per client address -- each with its clock set small, and
legitimate logins unhindered meanwhile.
"""

import socket
import threading
import time

import pytest

from helpers import RawClient, TIMEOUT, wait_until
from support import ScriptedBackend, wait_for_eof

GREETING = b"* OK IMAP4 Ready "


def refusing_wrong(peer):
    """A real server that refuses the password "wrong" and takes others."""
    peer.send(b"* OK scripted IMAP ready\r\n")
    while True:
        line = peer.readline()
        tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
        if rest.upper().startswith(b"LOGIN"):
            answer = b"NO refused" if rest.endswith(b'"wrong"') else b"OK in"
            peer.send(b"%s %s\r\n" % (tag, answer))
        else:
            peer.send(b"%s OK done\r\n" % tag)


def login(client, password, tag=b"a"):
    client.send(b'%s LOGIN alice "%s"\r\n' % (tag, password))
    return client.readline()


def greeted(port, source=None):
    client = RawClient(port, source=source)
    assert client.readline().startswith(GREETING)
    return client


# ---------------------------------------------------------------------------
# --auth_failure_delay
# ---------------------------------------------------------------------------

def test_a_failed_login_is_answered_late_and_nobody_else_waits(
        dovecot, perdition_factory):
    proxy = perdition_factory(["--auth_failure_delay", "2"], "IMAP4",
                              dovecot.imap_port)
    with greeted(proxy.port) as guesser, greeted(proxy.port) as user:
        sent = time.monotonic()
        guesser.send(b"g1 LOGIN alice guess\r\n")
        proxy.wait_for_log("answering the failed login in 2 s "
                           "(auth_failure_delay)")
        # Meanwhile another client logs in at once ...
        assert login(user, b"alicepw") == b"a OK You are so in\r\n"
        # ... and the guesser still has no answer.
        guesser.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            guesser.sock.recv(1)
        guesser.sock.setblocking(True)
        assert guesser.readline().startswith(b"g1 NO ")
        assert time.monotonic() - sent >= 2
        # The next attempt on the same connection may succeed.
        assert login(guesser, b"alicepw", b"g2") == \
            b"g2 OK You are so in\r\n"


def test_no_delay_with_zero(dovecot, perdition_factory):
    proxy = perdition_factory(["--auth_failure_delay", "0"], "IMAP4",
                              dovecot.imap_port)
    with greeted(proxy.port) as client:
        assert login(client, b"guess").startswith(b"a NO ")
    assert "(auth_failure_delay)" not in proxy.wait_for_log("status=failed")


# ---------------------------------------------------------------------------
# --login_failure_limit
# ---------------------------------------------------------------------------

def test_login_failure_limit_per_address_across_connections(
        perdition_factory):
    with ScriptedBackend(refusing_wrong) as backend:
        proxy = perdition_factory(["--login_failure_limit", "3/3"], "IMAP4",
                                  backend.port)
        with greeted(proxy.port) as client:
            for n in range(3):
                assert login(client, b"wrong").startswith(b"a NO ")
        first_failure = time.monotonic()
        with greeted(proxy.port) as client:
            # The right password, and still no real server is asked.
            assert login(client, b"right") == \
                b"a NO Too many failed logins, try again later\r\n"
        backend.join(3)
        log = proxy.wait_for_log("status=failed: login_failure_limit 3/3 "
                                 "reached")
        assert 'Auth: 127.0.0.1 user="alice" passwd="XXXXXX" server="" ' \
            'port="" status=failed: login_failure_limit' in log
        # Another address is not held back.
        with greeted(proxy.port, source=("127.0.0.2", 0)) as client:
            assert login(client, b"right") == b"a OK You are so in\r\n"
        # Once the window has passed, the address may log in again.
        def logs_in():
            with greeted(proxy.port) as client:
                return login(client, b"right") == b"a OK You are so in\r\n"
        wait_until(logs_in, timeout=TIMEOUT, what="a login after 3 s")
        assert time.monotonic() - first_failure >= 3 - 0.1
        assert len(backend.peers) == 5


# ---------------------------------------------------------------------------
# --login_timeout
# ---------------------------------------------------------------------------

def trickle(port, farewells, source=None):
    """A client that sends a LOGIN one byte at a time, a byte every 0.2 s,
    never finishing; it appends what perdition said last before closing,
    and how long after connecting."""
    start = time.monotonic()
    with RawClient(port, source=source) as client:
        client.readline()
        client.sock.settimeout(0.2)
        data = b"a LOGIN alice " + b"x" * 1000
        received = b""
        for byte in data:
            if time.monotonic() - start > TIMEOUT:
                break
            try:
                client.sock.send(bytes([byte]))
                chunk = client.sock.recv(1024)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    farewells.append((received, time.monotonic() - start))


@pytest.mark.parametrize("protocol, farewell", [
    ("IMAP4", b"* BYE Login timeout\r\n"),
    ("POP3", b"-ERR Login timeout\r\n"),
])
def test_login_timeout_ends_trickling_clients(
        dovecot, perdition_factory, protocol, farewell):
    """--authentication_timeout is an idle timeout, which a byte now and
    then defeats; --login_timeout bounds the whole time before login."""
    proxy = perdition_factory(["--login_timeout", "2",
                               "--authentication_timeout", "60"], protocol,
                              dovecot.imap_port if protocol == "IMAP4"
                              else dovecot.pop3_port)
    farewells = []
    tricklers = [threading.Thread(target=trickle, args=(proxy.port,
                                                        farewells))
                 for _ in range(20)]
    for thread in tricklers:
        thread.start()
    # Meanwhile a real user logs in and out as fast as ever.
    with RawClient(proxy.port) as client:
        client.readline()
        if protocol == "IMAP4":
            assert login(client, b"alicepw") == b"a OK You are so in\r\n"
        else:
            client.send(b"USER alice\r\nPASS alicepw\r\n")
            client.readline()
            assert client.readline() == b"+OK You are so in\r\n"
    assert not farewells
    for thread in tricklers:
        thread.join(TIMEOUT + 5)
    assert len(farewells) == 20
    for received, seconds in farewells:
        assert received == farewell
        assert 2 - 0.1 <= seconds < 6
    proxy.wait_for_log("Login timeout", count=20)


def test_login_timeout_covers_a_slow_real_server(perdition_factory):
    """The clock runs while perdition waits for the real server too."""
    def silent(peer):
        peer.read_to_end()

    with ScriptedBackend(silent) as backend:
        proxy = perdition_factory(["--login_timeout", "1"], "IMAP4",
                                  backend.port)
        with greeted(proxy.port) as client:
            client.send(b"a LOGIN alice alicepw\r\n")
            assert wait_for_eof(client) == b"* BYE Login timeout\r\n"
        backend.join(1)
        proxy.wait_for_log("status=failed: Login timeout")


def test_a_logged_in_session_outlives_the_login_timeout(
        dovecot, perdition_factory):
    proxy = perdition_factory(["--login_timeout", "1"], "IMAP4",
                              dovecot.imap_port)
    with greeted(proxy.port) as client:
        assert login(client, b"alicepw") == b"a OK You are so in\r\n"
        proxy_done = proxy.log().count("Login timeout")
        time.sleep(1.5)
        client.send(b"b NOOP\r\n")
        assert client.readline().startswith(b"b OK")
    assert proxy.log().count("Login timeout") == proxy_done == 0


# ---------------------------------------------------------------------------
# --client_connection_limit
# ---------------------------------------------------------------------------

def test_client_connection_limit(dovecot, perdition_factory):
    proxy = perdition_factory(["--client_connection_limit", "3"], "IMAP4",
                              dovecot.imap_port)
    clients = [greeted(proxy.port) for _ in range(3)]
    try:
        with RawClient(proxy.port) as fourth:
            assert wait_for_eof(fourth) == b"* BYE Too many connections " \
                b"from your address (client_connection_limit 3)\r\n"
        # Another address has its own three.
        with greeted(proxy.port, source=("127.0.0.2", 0)) as other:
            assert login(other, b"alicepw") == b"a OK You are so in\r\n"
        assert login(clients[0], b"alicepw") == b"a OK You are so in\r\n"
        def open_sessions():
            log = proxy.log()
            return log.count("]: Connect: ") - log.count("]: Close: ")
        wait_until(lambda: open_sessions() == 3, what="three sessions open")
        clients.pop().close()
        wait_until(lambda: open_sessions() == 2, what="two sessions open")
        with greeted(proxy.port) as again:
            assert login(again, b"alicepw") == b"a OK You are so in\r\n"
    finally:
        for client in clients:
            client.close()
