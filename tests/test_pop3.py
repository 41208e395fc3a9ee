"""POP3 through perdition, end to end (issue 2, items 3 and 4).

Real clients -- poplib, curl and a raw socket where the bytes matter --
talk to a perdition process in front of a real Dovecot.  The failures of
the real server that Dovecot cannot be made to show are played by a
scripted back-end (tests/support.py).
"""

import os
import poplib
import socket
import time

import pytest

from helpers import Perdition, RawClient, pop3_connect
from support import (ScriptedBackend, big_message, closes, curl,
                     receive_at_least, settled_usage, special_dovecot,
                     wait_for_closes, wait_for_eof, wait_for_usage)

# The greeting names the reverse lookup of the -b address, 127.0.0.1.
HOSTNAME = socket.gethostbyaddr("127.0.0.1")[0]
GREETING = b"+OK POP3 Ready %s\r\n" % HOSTNAME.encode()
CAPS = "UIDL  USER  TOP  SASL PLAIN LOGIN"
BIG = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    with special_dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


@pytest.fixture(scope="module")
def pop3(workdir, dovecot):
    """perdition with its defaults in front of Dovecot."""
    with Perdition([], "POP3", workdir, dovecot.pop3_port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def custom(workdir, dovecot):
    """perdition with its own capabilities, OK line and uname greeting."""
    with Perdition(["-B", "-I", CAPS, "-O", "Come in"], "POP3", workdir,
                   dovecot.pop3_port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def server_line(workdir, dovecot):
    with Perdition(["-o"], "POP3", workdir, dovecot.pop3_port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def backend():
    with ScriptedBackend(pop3_server()) as server:
        yield server


@pytest.fixture(scope="module")
def scripted(workdir, backend):
    """perdition in front of the scripted back-end, waiting at most 2 s
    for it or the client before the login."""
    with Perdition(["--authentication_timeout", "2"], "POP3", workdir,
                   backend.port) as proxy:
        yield proxy


def pop3_server(greeting=b"+OK scripted POP3 ready", on_retr=None):
    """A scripted POP3 server that takes any login; *on_retr(peer)* plays
    RETR."""
    def script(peer):
        peer.send(greeting + b"\r\n")
        while True:
            command = peer.readline().strip().partition(b" ")[0].upper()
            if command == b"QUIT":
                peer.send(b"+OK Bye\r\n")
                return
            if command == b"RETR" and on_retr:
                return on_retr(peer)
            peer.send(b"+OK Logged in\r\n" if command == b"PASS"
                      else b"+OK\r\n")
    return script


def command(client, line):
    """Send one command line; return the reply line."""
    client.send(line + b"\r\n")
    return client.readline()


def login(client, user, password):
    assert command(client, b"USER " + user).startswith(b"+OK")
    return command(client, b"PASS " + password)


def greeted(port):
    client = RawClient(port)
    assert client.readline() == GREETING
    return client


def auth_lines(proxy, user):
    return [line for line in proxy.log().splitlines()
            if f'Auth: 127.0.0.1 user="{user}"' in line]


# ---------------------------------------------------------------------------
# Before the login
# ---------------------------------------------------------------------------

def test_greeting_names_the_reverse_lookup_of_the_bind_address(pop3):
    with RawClient(pop3.port) as client:
        assert client.readline() == GREETING


def test_no_bind_banner_greets_with_the_uname_host_name(custom):
    with RawClient(custom.port) as client:
        assert client.readline() == \
            b"+OK POP3 Ready %s\r\n" % os.uname().nodename.encode()


def test_default_capabilities(pop3):
    with greeted(pop3.port) as client:
        client.send(b"CAPA\r\n")
        assert client.read_until(b"\r\n.\r\n") == (
            b"+OK Capability list follows\r\nUIDL\r\nUSER\r\n"
            b"SASL PLAIN\r\n.\r\n")


def test_capabilities_are_separated_by_two_spaces(custom):
    with RawClient(custom.port) as client:
        client.readline()
        client.send(b"capa\r\n")
        assert client.read_until(b"\r\n.\r\n") == (
            b"+OK Capability list follows\r\n"
            b"UIDL\r\nUSER\r\nTOP\r\nSASL PLAIN\r\n.\r\n")
    # (perdition's own SASL line replaces the option's: PLAIN is all it
    # offers)


def test_noop_and_quit(pop3):
    with greeted(pop3.port) as client:
        assert command(client, b"NOOP") == b"+OK\r\n"
        assert command(client, b"noop") == b"+OK\r\n"
        assert command(client, b"QUIT").startswith(b"+OK")
        assert wait_for_eof(client) == b""


@pytest.mark.parametrize("line", [b"STAT", b"RETR 1", b"APOP alice x",
                                  b"TOP 1 0", b""])
def test_other_commands_get_an_error_with_a_hint(pop3, line):
    with greeted(pop3.port) as client:
        reply = command(client, line)
        assert reply.startswith(b"-ERR ")
        assert all(word in reply for word in (b"USER", b"PASS", b"QUIT"))
        assert command(client, b"NOOP") == b"+OK\r\n"


@pytest.mark.parametrize("args, expected", [
    ([], b"USER, PASS, AUTH, CAPA, NOOP or QUIT"),
    (["--login_disabled"], b"CAPA, NOOP or QUIT")])
def test_the_valid_commands_named_are_those_allowed_now(
        perdition_factory, dovecot, args, expected):
    proxy = perdition_factory(args, "POP3", dovecot.pop3_port)
    with greeted(proxy.port) as client:
        assert command(client, b"FOO") == \
            b"-ERR Unknown command, expected %s\r\n" % expected
        assert command(client, b"USER bob") == (
            b"+OK USER bob set\r\n" if not args else
            b"-ERR Login disabled\r\n")


def test_too_many_errors_end_the_session(pop3):
    with greeted(pop3.port) as client:
        for n in range(9):
            assert command(client, b"FOO%d" % n).startswith(b"-ERR ")
        client.send(b"PASS before-user\r\n")
        data = wait_for_eof(client)
        assert data == b"-ERR USER must come before PASS\r\n" \
            b"-ERR Too many errors\r\n"
    assert "before-user" not in pop3.log()


def test_pass_before_user_and_user_without_argument(pop3):
    with greeted(pop3.port) as client:
        assert command(client, b"PASS alicepw").startswith(b"-ERR")
        assert command(client, b"USER").startswith(b"-ERR")
        assert command(client, b"USER alice") == b"+OK USER alice set\r\n"
        assert command(client, b"PASS alicepw") == b"+OK You are so in\r\n"


# ---------------------------------------------------------------------------
# The login on the real server
# ---------------------------------------------------------------------------

def test_login_then_the_real_server_answers(pop3, dovecot):
    dovecot.add_message("alice", b"Subject: one\r\n\r\nbody\r\n")
    direct = pop3_connect(dovecot.pop3_port)
    direct.user("alice")
    direct.pass_("alicepw")
    expected = direct.stat()
    direct.quit()
    client = pop3_connect(pop3.port)
    assert client.getwelcome() == GREETING.rstrip()
    assert client.user("alice") == b"+OK USER alice set"
    assert client.pass_("alicepw") == b"+OK You are so in"
    assert client.stat() == expected and expected[0] >= 1
    assert client.quit().startswith(b"+OK")
    log = pop3.wait_for_log('Close: 127.0.0.1 user="alice"')
    assert (f'Auth: 127.0.0.1 user="alice" passwd="XXXXXX" '
            f'server="127.0.0.1" port="{dovecot.pop3_port}" status=ok') in log
    assert "alicepw" not in log


def test_lower_case_commands_log_in(pop3):
    with greeted(pop3.port) as client:
        assert command(client, b"user bob") == b"+OK USER bob set\r\n"
        assert command(client, b"pass bobpw") == b"+OK You are so in\r\n"
        assert command(client, b"STAT").startswith(b"+OK ")


def test_wrong_password_then_the_right_one(pop3):
    client = pop3_connect(pop3.port)
    client.user("user10")
    with pytest.raises(poplib.error_proto, match="-ERR"):
        client.pass_("wrong")
    with pytest.raises(poplib.error_proto, match="-ERR"):
        client.stat()           # still talking to perdition, not logged in
    client.user("user10")
    assert client.pass_("pw10") == b"+OK You are so in"
    assert client.stat() == (0, 0)
    client.quit()
    lines = auth_lines(pop3, "user10")
    assert len(lines) == 2
    assert "status=failed" in lines[0] and lines[1].endswith("status=ok")


@pytest.mark.parametrize("user", ["quoter", "j\u00fcrgen"])
def test_passwords_with_spaces_quotes_and_utf8(pop3, dovecot, user):
    client = pop3_connect(pop3.port)
    client.user(user)
    assert client.pass_(dovecot.users[user]) == b"+OK You are so in"
    assert client.stat() == (0, 0)
    client.quit()


def test_pipelined_login_and_commands(pop3):
    with greeted(pop3.port) as client:
        client.send(b"USER bob\r\nPASS bobpw\r\nNOOP\r\nQUIT\r\n")
        replies = wait_for_eof(client).splitlines()
        assert replies[:3] == [b"+OK USER bob set", b"+OK You are so in",
                               b"+OK"]
        assert replies[3].startswith(b"+OK") and len(replies) == 4


def test_big_message_byte_for_byte(pop3, dovecot):
    message = big_message(BIG, seed=1)
    dovecot.add_message("user1", message)
    client = pop3_connect(pop3.port)
    client.user("user1")
    client.pass_("pw1")
    assert client.stat() == (1, len(message))
    response, lines, octets = client.retr(1)
    assert response.startswith(b"+OK")
    assert b"\r\n".join(lines) + b"\r\n" == message
    client.quit()
    assert wait_for_closes(pop3, "user1", 1)[0][1] > len(message)


def test_ok_line(custom):
    with RawClient(custom.port) as client:
        client.readline()
        assert login(client, b"bob", b"bobpw") == b"+OK Come in\r\n"


def test_server_ok_line_passes_the_real_servers_line(server_line, dovecot):
    with RawClient(dovecot.pop3_port) as direct:
        direct.readline()
        expected = login(direct, b"bob", b"bobpw")
    with greeted(server_line.port) as client:
        assert login(client, b"bob", b"bobpw") == expected
        assert expected.startswith(b"+OK") and b"so in" not in expected


def test_curl_lists_and_retrieves_through_perdition(pop3, dovecot):
    messages = [b"Subject: curl %d\r\n\r\n%s\r\n" % (n, b"x" * n * 100)
                for n in (1, 2)]
    for message in messages:
        dovecot.add_message("user2", message)
    listing = curl("-u", "user2:pw2", f"pop3://127.0.0.1:{pop3.port}/")
    assert listing == curl("-u", "user2:pw2",
                           f"pop3://127.0.0.1:{dovecot.pop3_port}/")
    assert listing.splitlines() == [b"%d %d" % (n, len(message))
                                    for n, message in enumerate(messages, 1)]
    assert curl("-u", "user2:pw2",
                f"pop3://127.0.0.1:{pop3.port}/2") == messages[1]


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("user, password", [
    (b"bob\rDELE 1", b"bobpw"),
    (b"bob", b"bobpw\rDELE 1"),
    (b"bob\x0bRSET", b"bobpw"),
])
def test_control_characters_never_reach_the_real_server(
        scripted, backend, user, password):
    backend.reset(pop3_server())
    with RawClient(scripted.port) as client:
        client.readline()
        assert login(client, user, password).startswith(b"-ERR")
        backend.join(1)
        assert backend.received() == b""
        assert login(client, b"bob", b"bobpw") == b"+OK You are so in\r\n"
        assert backend.received() == b"USER bob\r\nPASS bobpw\r\n"
    log = scripted.wait_for_log("status=failed")
    assert "\rDELE" not in log and "\x0b" not in log


def test_nul_byte_in_a_command(pop3):
    with greeted(pop3.port) as client:
        assert command(client, b"USER al\0ice").startswith(b"-ERR")
        assert command(client, b"NOOP") == b"+OK\r\n"
        other = pop3_connect(pop3.port)
        other.user("bob")
        assert other.pass_("bobpw") == b"+OK You are so in"
        other.quit()
        assert login(client, b"alice", b"alicepw") == b"+OK You are so in\r\n"
    assert "al\\x00ice" not in pop3.log()


def test_long_line_within_the_limit(pop3):
    with greeted(pop3.port) as client:
        user = b"u" * 8000
        assert command(client, b"USER " + user) == \
            b"+OK USER " + user + b" set\r\n"
        assert login(client, b"bob", b"bobpw") == b"+OK You are so in\r\n"


@pytest.mark.parametrize("size", [8200, 1024 * 1024])
def test_over_long_line(pop3, size):
    errors = pop3.log().count("Line too long")
    with greeted(pop3.port) as client:
        client.send(b"USER " + b"x" * size + b"\r\n")
        pop3.wait_for_log("Line too long", count=errors + 1)
        # What the client sends after the error is read and dropped, so
        # the connection is not reset before the client reads the error.
        client.send(b"NOOP\r\n" * 10000)
        assert wait_for_eof(client).startswith(b"-ERR ")
    other = pop3_connect(pop3.port)
    other.user("bob")
    assert other.pass_("bobpw") == b"+OK You are so in"
    other.quit()


# ---------------------------------------------------------------------------
# Failures of the real server
# ---------------------------------------------------------------------------

def test_unreachable_server_then_retry(perdition_factory):
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))     # bound, not listening: refused
    port = reserved.getsockname()[1]
    proxy = perdition_factory([], "POP3", port)
    with reserved, greeted(proxy.port) as client:
        assert login(client, b"bob", b"bobpw") == \
            b"-ERR Could not connect to server\r\n"
        proxy.wait_for_log('user="bob" passwd="XXXXXX" server="127.0.0.1" '
                           f'port="{port}" status=failed')
        reserved.close()
        with ScriptedBackend(pop3_server(), port=port):
            assert login(client, b"bob", b"bobpw") == \
                b"+OK You are so in\r\n"


def test_server_greeting_like_perdition_is_a_loop(scripted, backend):
    backend.reset(pop3_server(greeting=GREETING.rstrip()))
    with greeted(scripted.port) as client:
        assert login(client, b"bob", b"bobpw") == \
            b"-ERR Re-Authentication Failure\r\n"
        backend.join(1)
        assert backend.received() == b""
    scripted.wait_for_log("status=failed: Re-Authentication Failure")


def test_perdition_pointed_at_itself(tmp_path):
    proxy = Perdition([], "POP3", tmp_path)
    proxy.args += ["-s", f"127.0.0.1:{proxy.port}", "-M", ""]
    with proxy, greeted(proxy.port) as client:
        assert login(client, b"bob", b"bobpw") == \
            b"-ERR Re-Authentication Failure\r\n"
        assert command(client, b"NOOP") == b"+OK\r\n"


def test_server_drops_mid_transfer(scripted, backend):
    half_a_message = b"+OK 10000000 octets\r\n" + b"x" * 1000 + \
        b"\r\n" * 500000
    backend.reset(pop3_server(
        on_retr=lambda peer: peer.send(half_a_message)))
    with greeted(scripted.port) as client:
        assert login(client, b"dropped", b"pw") == b"+OK You are so in\r\n"
        client.send(b"RETR 1\r\n")
        assert wait_for_eof(client) == half_a_message
    assert wait_for_closes(scripted, "dropped", 1) == \
        [(len(b"RETR 1\r\n"), len(half_a_message))]
    backend.reset(pop3_server())
    with greeted(scripted.port) as client:
        assert login(client, b"bob", b"bobpw") == b"+OK You are so in\r\n"


def test_client_gone_mid_transfer(pop3, dovecot):
    message = big_message(BIG, seed=2)
    dovecot.add_message("user3", message)
    client = pop3_connect(pop3.port)    # once to the end: pipes warm up
    client.user("user3")
    client.pass_("pw3")
    assert client.retr(1)[2] > BIG
    client.quit()
    baseline = settled_usage(pop3)
    count = len(closes(pop3, "user3"))
    with greeted(pop3.port) as client:
        assert login(client, b"user3", b"pw3") == b"+OK You are so in\r\n"
        client.send(b"RETR 1\r\n")
        receive_at_least(client, 1024 * 1024)
    wait_for_closes(pop3, "user3", count + 1)
    other = pop3_connect(pop3.port)
    other.user("user3")
    assert other.pass_("pw3") == b"+OK You are so in"
    other.quit()
    wait_for_usage(pop3, baseline)


def test_server_hangs_after_greeting(scripted, backend):
    def hang(peer):
        peer.send(b"+OK hanging\r\n")
        peer.read_to_end()

    backend.reset(hang)
    with greeted(scripted.port) as client:
        start = time.monotonic()
        reply = login(client, b"bob", b"bobpw")
        elapsed = time.monotonic() - start
        assert reply.startswith(b"-ERR") and 1.5 < elapsed < 6
        backend.reset(pop3_server())
        assert login(client, b"bob", b"bobpw") == b"+OK You are so in\r\n"


def test_idle_client_before_login_times_out(scripted):
    with greeted(scripted.port) as client:
        assert command(client, b"NOOP") == b"+OK\r\n"
        start = time.monotonic()
        assert wait_for_eof(client).startswith(b"-ERR ")
        assert 1.5 < time.monotonic() - start < 6


def test_idle_timeout_after_login(perdition_factory, dovecot):
    proxy = perdition_factory(["-t", "2"], "POP3", dovecot.pop3_port)
    with greeted(proxy.port) as client:
        assert login(client, b"bob", b"bobpw") == b"+OK You are so in\r\n"
        for _ in range(4):          # busy for longer than the timeout
            time.sleep(0.75)
            assert command(client, b"NOOP") == b"+OK\r\n"
        start = time.monotonic()
        assert wait_for_eof(client) == b""
        assert 1.5 < time.monotonic() - start < 6
    proxy.wait_for_log("idle timeout")
    proxy.wait_for_log('Close: 127.0.0.1 user="bob"')
