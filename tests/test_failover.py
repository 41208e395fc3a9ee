"""Fail-over across real servers (issue 11, part 3): a server that cannot
be reached -- refused, silent, failing its TLS handshake -- is followed by
the next one of -s or of a map's answer; it is then held back for
--server_hold_time; a refused password is an answer, never a reason to
try another server.  The servers that answer are a real Dovecot.
"""

import socket
import time

import pytest

from dovecot import Dovecot, free_port
from helpers import RawClient, wait_until
from support import ScriptedBackend

GREETING = b"* OK IMAP4 Ready "


def silent(peer):
    """A real server that accepts and never greets."""
    peer.read_to_end()


def refusing(peer):
    """A real server that refuses every login."""
    peer.send(b"* OK scripted IMAP ready\r\n")
    while True:
        tag = peer.readline().partition(b" ")[0]
        peer.send(b"%s NO refused\r\n" % tag)


def at(port):
    return "127.0.0.1:%d" % port


def logs_in(proxy, password=b"alicepw"):
    with RawClient(proxy.port) as client:
        assert client.readline().startswith(GREETING)
        client.send(b"a LOGIN alice %s\r\n" % password)
        return client.readline()


def failures(proxy, port):
    return proxy.log().count("Server 127.0.0.1 port %d failed: " % port)


def test_a_refused_connection_is_followed_by_the_next_server(
        dovecot, perdition_factory):
    dead = free_port()
    proxy = perdition_factory(["-s", "%s,%s" % (at(dead),
                                                at(dovecot.imap_port)),
                               "-M", ""], "IMAP4")
    for _ in range(4):      # round robin starts at each server in turn
        assert logs_in(proxy) == b"a OK You are so in\r\n"
    log = proxy.wait_for_log('status=ok', count=4)
    assert "Server 127.0.0.1 port %d failed: Could not connect to " \
        "127.0.0.1:%d: [Errno 111] Connection refused; trying the next" \
        % (dead, dead) in log
    assert log.count('server="127.0.0.1" port="%d" status=ok'
                     % dovecot.imap_port) == 4
    # Held back for --server_hold_time (10 s): tried once, not twice.
    assert failures(proxy, dead) == 1


def test_a_silent_server_is_unreachable_after_connect_timeout(
        dovecot, perdition_factory):
    with ScriptedBackend(silent) as mute:
        proxy = perdition_factory([
            "--connect_timeout", "1", "-M", "", "-s",
            "%s,%s" % (at(mute.port), at(dovecot.imap_port))], "IMAP4")
        assert logs_in(proxy) == b"a OK You are so in\r\n"
        mute.join(1)
    assert "Server 127.0.0.1 port %d failed: Server error: timed out; " \
        "trying the next" % mute.port in proxy.log()


class Unaccepting:
    """A listening socket whose backlog is full: a further connect is
    never answered (the kernel drops its SYN) and so times out, as a
    connect to a host that has gone does."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.port = self.listener.getsockname()[1]
        self.fillers = []

    def __enter__(self):
        try:
            for _ in range(4):
                filler = socket.socket()
                self.fillers.append(filler)
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", self.port))
            with socket.socket() as probe:
                probe.settimeout(0.5)
                try:
                    probe.connect(("127.0.0.1", self.port))
                except socket.timeout:
                    return self
            raise AssertionError("a connect beyond a full backlog was "
                                 "accepted: no unreachable server here")
        except BaseException:
            self.close()
            raise

    def close(self):
        for sock in self.fillers + [self.listener]:
            sock.close()

    def __exit__(self, *exc_info):
        self.close()


def test_a_connect_never_accepted_times_out_to_the_next_server(
        dovecot, perdition_factory):
    """A server whose host has gone answers no SYN, and the kernel would
    retry for minutes: --connect_timeout gives up on it."""
    with Unaccepting() as blackhole:
        proxy = perdition_factory([
            "--connect_timeout", "1", "-M", "", "-s",
            "%s,%s" % (at(blackhole.port), at(dovecot.imap_port))], "IMAP4")
        asked = time.monotonic()
        assert logs_in(proxy) == b"a OK You are so in\r\n"
        assert 1 - 0.1 <= time.monotonic() - asked < 3
    assert "Server 127.0.0.1 port %d failed: Could not connect to " \
        "127.0.0.1:%d: timed out; trying the next" \
        % (blackhole.port, blackhole.port) in proxy.log()


def trickling(peer):
    """A real server that greets one byte every 0.3 s (7.8 s in all),
    each byte well within --connect_timeout of the one before."""
    for byte in b"* OK scripted IMAP ready\r\n":
        peer.send(bytes([byte]))
        time.sleep(0.3)
    peer.read_to_end()


def test_a_trickled_greeting_is_unreachable_after_connect_timeout(
        dovecot, perdition_factory):
    """--connect_timeout bounds the greeting as a whole, not each read: a
    server that drips it out cannot hold the login for long."""
    with ScriptedBackend(trickling) as slow:
        proxy = perdition_factory([
            "--connect_timeout", "1", "-M", "", "-s",
            "%s,%s" % (at(slow.port), at(dovecot.imap_port))], "IMAP4")
        asked = time.monotonic()
        assert logs_in(proxy) == b"a OK You are so in\r\n"
        assert 1 - 0.1 <= time.monotonic() - asked < 3
        slow.join(1)
    log = proxy.wait_for_log("status=ok")
    assert "Server 127.0.0.1 port %d failed: Server error: timed out; " \
        "trying the next" % slow.port in log
    assert 'port="%d" status=ok' % dovecot.imap_port in log


def test_a_failed_tls_handshake_is_followed_by_the_next_server(
        dovecot, perdition_factory):
    """The first server speaks no TLS on its port; the second does."""
    proxy = perdition_factory([
        "--ssl_mode", "ssl_outgoing", "--ssl_ca_file", dovecot.cert_file,
        "-M", "", "-s", "%s,%s" % (at(dovecot.imap_port),
                                   at(dovecot.imaps_port))], "IMAP4")
    assert logs_in(proxy) == b"a OK You are so in\r\n"
    log = proxy.wait_for_log("status=ok")
    assert "Server 127.0.0.1 port %d failed: TLS: " % dovecot.imap_port in log
    assert 'port="%d" status=ok' % dovecot.imaps_port in log


def test_a_refused_password_is_an_answer(perdition_factory):
    with ScriptedBackend(refusing) as first, \
            ScriptedBackend(refusing) as second:
        proxy = perdition_factory(["-M", "", "-s", "%s,%s" % (
            at(first.port), at(second.port))], "IMAP4")
        assert logs_in(proxy, b"wrong").startswith(b"a NO ")
        proxy.wait_for_log("status=failed")
        assert len(first.every_peer) + len(second.every_peer) == 1
    assert "failed: Server" not in proxy.log()


def test_the_servers_of_a_map_answer_are_tried_in_order(
        dovecot, tmp_path, perdition_factory):
    dead = free_port()
    Dovecot._make_traversable(str(tmp_path))
    popmap = tmp_path / "popmap.re"
    popmap.write_text("^alice$ 127.0.0.1:%d, 127.0.0.1:%d\n"
                      % (dead, dovecot.imap_port))
    popmap.chmod(0o644)
    proxy = perdition_factory(["-M", "posix_regex", "-m", str(popmap)],
                              "IMAP4")
    assert logs_in(proxy) == b"a OK You are so in\r\n"
    assert failures(proxy, dead) == 1
    # Held back: the next login goes straight to Dovecot.
    assert logs_in(proxy) == b"a OK You are so in\r\n"
    assert failures(proxy, dead) == 1


@pytest.mark.parametrize("hold", ["0", "10"])
def test_when_every_server_is_held_all_are_tried_again(
        dovecot, perdition_factory, hold):
    dead = [free_port(), free_port()]
    proxy = perdition_factory(["--server_hold_time", hold, "-M", "", "-s",
                               ",".join(at(port) for port in dead)], "IMAP4")
    for attempt in (1, 2):
        assert logs_in(proxy) == b"a NO Could not connect to server\r\n"
        proxy.wait_for_log("status=failed", count=attempt)
        assert [failures(proxy, port) for port in dead] == [attempt] * 2


def test_a_held_server_is_tried_again_after_the_hold_time(
        dovecot, perdition_factory):
    dead = free_port()
    proxy = perdition_factory([
        "--server_hold_time", "1", "-M", "", "-s",
        "%s,%s" % (at(dead), at(dovecot.imap_port))], "IMAP4")
    assert logs_in(proxy) == b"a OK You are so in\r\n"
    assert failures(proxy, dead) == 1
    held = time.monotonic()
    for _ in range(2):      # starting at each server: the dead one held
        assert logs_in(proxy) == b"a OK You are so in\r\n"
    assert failures(proxy, dead) == 1

    def tried_again():
        assert logs_in(proxy) == b"a OK You are so in\r\n"
        return failures(proxy, dead) == 2

    wait_until(tried_again, timeout=5, what="the dead server tried again")
    # The hold began a little before the first answer reached this clock.
    assert time.monotonic() - held >= 1 - 0.1
