"""Brute force and slow clients (issue 11, parts 4 and 5): the delay
after a failed login, the limit on failed logins per client address, the
login timeout that a trickling or flooding client cannot stretch, and the
limit on connections per client address -- each with its clock set small,
and legitimate logins unhindered meanwhile.
"""

import os
import select
import socket
import sys
import threading
import time

import pytest

from dovecot import Dovecot, free_port
from helpers import PERDITION, RawClient, TIMEOUT, wait_until
from support import ScriptedBackend, wait_for_eof

sys.path.insert(0, os.path.dirname(PERDITION))
import perdition  # noqa: E402

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


def test_an_unreachable_server_is_no_failed_login(perdition_factory):
    """During an outage users keep retrying: a login that reached no real
    server is no guess at a password, so it neither waits
    --auth_failure_delay nor counts towards --login_failure_limit."""
    dead = free_port()
    proxy = perdition_factory(["--login_failure_limit", "2/30",
                               "--auth_failure_delay", "1"], "IMAP4", dead)
    with greeted(proxy.port) as client:
        for _ in range(3):
            asked = time.monotonic()
            assert login(client, b"alicepw") == \
                b"a NO Could not connect to server\r\n"
            assert time.monotonic() - asked < 1
    log = proxy.wait_for_log("status=failed: Could not connect to "
                             "127.0.0.1:%d" % dead, count=3)
    assert "(auth_failure_delay)" not in log
    # The server is back, on the same port: the address is not blocked.
    with ScriptedBackend(refusing_wrong, port=dead):
        with greeted(proxy.port) as client:
            assert login(client, b"alicepw") == b"a OK You are so in\r\n"
    assert "reached" not in proxy.wait_for_log("status=ok")


LOOKUP_LOGGING_MAP = """\
from perdition_maps import Map as BaseMap


class Map(BaseMap):
    \"\"\"Sends everyone where -m says, noting each lookup in a file.\"\"\"

    def lookup(self, key, context):
        with open(%r, "a") as f:
            f.write(key + "\\n")
        return self.option
"""


def test_a_blocked_address_asks_no_map_and_no_server(tmp_path,
                                                     perdition_factory):
    """The limit is there to spare the map and the real server: a
    blocked login costs neither a lookup nor a connection."""
    mapdir = tmp_path / "map"
    mapdir.mkdir()
    Dovecot._make_traversable(str(mapdir))
    lookups = mapdir / "lookups"
    lookups.write_text("")
    lookups.chmod(0o666)        # perdition looks up as nobody
    site_map = mapdir / "sitemap.py"
    site_map.write_text(LOOKUP_LOGGING_MAP % str(lookups))
    site_map.chmod(0o644)
    with ScriptedBackend(refusing_wrong) as backend:
        proxy = perdition_factory(["--login_failure_limit", "2/30",
                                   "-M", str(site_map),
                                   "-m", "127.0.0.1:%d" % backend.port],
                                  "IMAP4")
        with greeted(proxy.port) as client:
            for _ in range(2):
                assert login(client, b"wrong").startswith(b"a NO ")
            backend.join(2)
            assert lookups.read_text() == "alice\n" * 2
            assert login(client, b"right") == \
                b"a NO Too many failed logins, try again later\r\n"
            proxy.wait_for_log("status=failed: login_failure_limit 2/30 "
                               "reached")
        assert lookups.read_text() == "alice\n" * 2
        assert len(backend.every_peer) == 2


def proxied(port, address):
    """A connection that a balancer on 127.0.0.1 says comes from
    *address*, with a PROXY v1 header."""
    client = RawClient(port)
    client.send(b"PROXY TCP4 %s 127.0.0.1 40000 143\r\n" % address)
    return client


def test_the_limits_count_the_address_a_proxy_header_names(
        perdition_factory):
    """Behind a balancer every connection comes from the balancer: the
    per-address limits must count the client the header names, or one
    client would lock out all the others."""
    with ScriptedBackend(refusing_wrong) as backend:
        proxy = perdition_factory(["--proxy_protocol", "127.0.0.1",
                                   "--client_connection_limit", "1",
                                   "--login_failure_limit", "2/30"],
                                  "IMAP4", backend.port)
        with proxied(proxy.port, b"192.0.2.1") as first, \
                proxied(proxy.port, b"192.0.2.2") as second:
            assert first.readline().startswith(GREETING)
            assert second.readline().startswith(GREETING)
            with proxied(proxy.port, b"192.0.2.1") as again:
                assert wait_for_eof(again) == b"* BYE Too many connections " \
                    b"from your address (client_connection_limit 1)\r\n"
            for _ in range(2):
                assert login(first, b"wrong").startswith(b"a NO ")
            assert login(first, b"right") == \
                b"a NO Too many failed logins, try again later\r\n"
            assert login(second, b"right") == b"a OK You are so in\r\n"
        log = proxy.wait_for_log('Close: 192.0.2.2 user="alice"')
    assert 'Auth: 192.0.2.1 user="alice" passwd="XXXXXX" server="" ' \
        'port="" status=failed: login_failure_limit 2/30 reached' in log
    assert "192.0.2.1: Too many connections from your address" in log


def test_the_failure_table_is_bounded_and_forgets_the_oldest_first(
        monkeypatch):
    """A flood of failures from ever new addresses cannot grow the table
    past MAX_FAILURE_ADDRESSES; the address whose last failure is oldest
    is forgotten first, so a persistent guesser stays blocked."""
    monkeypatch.setattr(perdition, "MAX_FAILURE_ADDRESSES", 3)
    failures = perdition.LoginFailureLimit()
    limit = perdition.Rate(1, 60)
    guesser = "192.0.2.1"
    failures.failed(guesser, limit)
    for n in range(2, 12):
        failures.failed("192.0.2.%d" % n, limit)
        failures.failed(guesser, limit)     # seen again: kept
        assert failures.blocked(guesser, limit)
    assert len(failures._failures) == 3
    assert [n for n in range(2, 12)
            if failures.blocked("192.0.2.%d" % n, limit)] == [10, 11]
    # A new address now drops 10, the one not seen longest.
    failures.failed("198.51.100.1", limit)
    assert [failures.blocked(address, limit) for address in (
        "192.0.2.10", "192.0.2.11", guesser, "198.51.100.1")] == \
        [False, True, True, True]


# ---------------------------------------------------------------------------
# --login_timeout
# ---------------------------------------------------------------------------

def test_cancelled_login_clocks_do_not_pile_up():
    """Every login cancels its clock.  The heap of deadlines is rebuilt
    once cancelled entries are most of it, so a busy server does not keep
    one for each login of the last --login_timeout seconds; a deadline
    still due runs on time."""
    deadlines = perdition.Deadlines()
    due = threading.Event()
    deadlines.add(0.5, due.set)
    for _ in range(20000):
        assert deadlines.cancel(deadlines.add(180, due.set))
    assert len(deadlines) <= 2 * 1024 + 2
    assert due.wait(TIMEOUT) and len(deadlines) <= 2 * 1024 + 1
    clock = deadlines.add(0, due.clear)
    wait_until(lambda: not due.is_set(), what="a deadline run")
    assert not deadlines.cancel(clock)      # it has run


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


def flood(port, read, limit=15):
    """Pipeline `a NOOP` lines at perdition as fast as it takes them
    (some 4 MB fit in the buffers before a client that reads nothing has
    to wait), reading the answers only if *read*, until perdition ends
    the connection: (the last bytes received, seconds from connecting to
    the end).  The end is a hang-up or reset the socket reports, or, for
    a reader, end of file.  Fails if the connection is still open after
    *limit* seconds."""
    chunk = b"a NOOP\r\n" * 8192
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) \
            as sock:
        start = time.monotonic()
        sock.setblocking(False)
        poller = select.poll()
        watch = select.POLLIN if read else select.POLLRDHUP
        poller.register(sock, watch | select.POLLOUT)
        tail = b""
        while True:
            left = start + limit - time.monotonic()
            assert left > 0, "still open after %s s; last received %r" \
                % (limit, tail[-100:])
            events = poller.poll(left * 1000)
            mask = events[0][1] if events else 0
            if read and mask & (select.POLLIN | select.POLLHUP
                                | select.POLLERR):
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    data = None
                except ConnectionResetError:
                    break
                if data == b"":
                    break
                tail = (tail + (data or b""))[-200:]
            elif not read and mask & (select.POLLRDHUP | select.POLLHUP
                                      | select.POLLERR):
                break
            if mask & select.POLLOUT:
                try:
                    sock.send(chunk)
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    if not read:
                        break
                    poller.modify(sock, watch)  # read what is left
        return tail, time.monotonic() - start


def test_login_timeout_ends_a_client_that_never_reads(
        dovecot, perdition_factory):
    """A client that pipelines commands and reads no answer holds
    perdition in a send once the buffers are full, where the clock's
    interrupt cannot reach it: the socket is shut FAREWELL_TIME later,
    long before --authentication_timeout."""
    proxy = perdition_factory(["--login_timeout", "2",
                               "--authentication_timeout", "60",
                               "--max_errors", "0"], "IMAP4",
                              dovecot.imap_port)
    _, seconds = flood(proxy.port, read=False)
    assert 2 - 0.1 <= seconds < 15
    proxy.wait_for_log("Login timeout")


def test_login_timeout_answers_no_queued_command(dovecot, perdition_factory):
    """Commands a flooding client has queued are not answered once the
    clock has run out: the farewell follows at once, where answering the
    queue would keep the session for as long as the client sends."""
    proxy = perdition_factory(["--login_timeout", "2",
                               "--authentication_timeout", "60",
                               "--max_errors", "0"], "IMAP4",
                              dovecot.imap_port)
    received, seconds = flood(proxy.port, read=True)
    assert received.endswith(b"a OK NOOP completed\r\n"
                             b"* BYE Login timeout\r\n")
    # The clock, then FAREWELL_TIME at most, and a margin.
    assert 2 - 0.1 <= seconds < 2 + perdition.FAREWELL_TIME + 1
    proxy.wait_for_log("Login timeout")


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
