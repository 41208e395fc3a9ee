"""IMAP4 through perdition, end to end (issue 2, items 3 and 4).

Real clients -- imaplib, curl and a raw socket where the bytes matter --
talk to a perdition process in front of a real Dovecot.  The failures of
the real server that Dovecot cannot be made to show, and the proof of what
exactly reached the server, come from a scripted back-end
(tests/support.py).
"""

import os
import re
import socket
import time

import imaplib
import pytest

from helpers import Perdition, RawClient, imap_connect
from support import (ScriptedBackend, big_message, closes, curl,
                     receive_at_least, settled_usage, special_dovecot,
                     wait_for_closes, wait_for_eof, wait_for_usage)

# The greeting names the reverse lookup of the -b address, 127.0.0.1.
HOSTNAME = socket.gethostbyaddr("127.0.0.1")[0]
GREETING = b"* OK IMAP4 Ready %s\r\n" % HOSTNAME.encode()
# ... and with -B, the uname host name.
UNAME_GREETING = b"* OK IMAP4 Ready %s\r\n" % os.uname().nodename.encode()
CAPS = "IMAP4REV1 LITERAL+ ID"
BIG = 10 * 1024 * 1024
JURGEN = "j\u00fcrgen".encode()
JURGEN_PW = "p\u00e4ssw\u00f6rd".encode()


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    with special_dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


@pytest.fixture(scope="module")
def imap(workdir, dovecot):
    """perdition with its defaults in front of Dovecot."""
    with Perdition([], "IMAP4", workdir, dovecot.imap_port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def custom(workdir, dovecot):
    """perdition with LITERAL+ and more, its own OK line and the uname
    greeting."""
    with Perdition(["-B", "-I", CAPS, "-O", "Come in"], "IMAP4", workdir,
                   dovecot.imap_port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def server_line(workdir, dovecot):
    with Perdition(["--server_ok_line"], "IMAP4", workdir,
                   dovecot.imap_port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def backend():
    with ScriptedBackend(imap_server()) as server:
        yield server


@pytest.fixture(scope="module")
def scripted(workdir, backend):
    """perdition in front of the scripted back-end, waiting at most 2 s
    for it or the client before the login (the option's other spelling)."""
    with Perdition(["--authenticate_timeout", "2"], "IMAP4", workdir,
                   backend.port) as proxy:
        yield proxy


SCRIPTED_LITERAL_RE = re.compile(rb"\{(\d+)(\+?)\}\r?\n\Z")


def read_command(peer):
    """One IMAP command from *peer*: its text, with each literal left as
    its {size}, and the list of literals."""
    text, literals = b"", []
    while True:
        line = peer.readline()
        text += line.rstrip(b"\r\n")
        match = SCRIPTED_LITERAL_RE.search(line)
        if not match:
            return text, literals
        if not match.group(2):
            peer.send(b"+ go ahead\r\n")
        literals.append(peer.read_exact(int(match.group(1))))


def imap_server(greeting=b"* OK scripted IMAP ready", commands=None,
                on_fetch=None):
    """A scripted IMAP server that takes any login.  Each command it reads
    is appended to *commands*; *on_fetch(peer)* plays FETCH."""
    def script(peer):
        peer.send(greeting + b"\r\n")
        while True:
            text, literals = read_command(peer)
            if commands is not None:
                commands.append((text, literals))
            tag, _, rest = text.partition(b" ")
            name = rest.partition(b" ")[0].upper()
            if name == b"FETCH" and on_fetch:
                return on_fetch(peer)
            if name == b"LOGOUT":
                peer.send(b"* BYE\r\n%s OK LOGOUT completed\r\n" % tag)
                return
            peer.send(b"%s OK %s completed\r\n" % (tag, name))
    return script


def greeted(port, greeting=GREETING):
    client = RawClient(port)
    assert client.readline() == greeting
    return client


def response(client, tag):
    """The lines up to and including the one tagged *tag*."""
    lines = []
    while not lines or not lines[-1].startswith(tag + b" "):
        line = client.readline()
        assert line, f"connection closed; got {lines}"
        lines.append(line)
    return lines


def command(client, line):
    """Send one command line; return its tagged response line."""
    client.send(line + b"\r\n")
    return response(client, line.partition(b" ")[0])[-1]


def login(client, user=b"bob", password=b"bobpw", tag=b"L1"):
    return command(client, b"%s LOGIN %s %s" % (tag, user, password))


# ---------------------------------------------------------------------------
# Before the login
# ---------------------------------------------------------------------------

def test_greeting_names_the_reverse_lookup_of_the_bind_address(imap):
    with RawClient(imap.port) as client:
        assert client.readline() == GREETING


def test_no_bind_banner_greets_with_the_uname_host_name(custom):
    with RawClient(custom.port) as client:
        assert client.readline() == UNAME_GREETING


def test_no_lookup_implies_no_bind_banner(perdition_factory, dovecot):
    proxy = perdition_factory(["-n"], "IMAP4", dovecot.imap_port)
    with RawClient(proxy.port) as client:
        assert client.readline() == UNAME_GREETING
        client.send(b"n1 LOGIN bob bobpw\r\n")
        assert client.readline() == b"n1 OK You are so in\r\n"


def test_default_capability(imap):
    with greeted(imap.port) as client:
        client.send(b"c1 CAPABILITY\r\n")
        lines = response(client, b"c1")
        assert lines[0] == \
            b"* CAPABILITY IMAP4 IMAP4REV1 ID AUTH=PLAIN SASL-IR\r\n"
        assert lines[1].startswith(b"c1 OK ") and len(lines) == 2


def test_capability_from_option(custom):
    with greeted(custom.port, UNAME_GREETING) as client:
        client.send(b"c1 capability\r\n")
        assert response(client, b"c1")[0] == \
            b"* CAPABILITY IMAP4REV1 LITERAL+ ID AUTH=PLAIN SASL-IR\r\n"


def test_noop_and_logout(imap):
    with greeted(imap.port) as client:
        assert command(client, b"n1 NOOP").startswith(b"n1 OK")
        client.send(b"n2 LOGOUT\r\n")
        lines = response(client, b"n2")
        assert lines[0].startswith(b"* BYE") and lines[1].startswith(b"n2 OK")
        assert wait_for_eof(client) == b""


@pytest.mark.parametrize("tag", [b"A001", b"a.b-c_d", b"x}y", b"~!#$&'|",
                                 b"1", b"T" * 200, b"<tag>:/;=?@^`"])
def test_tags_are_echoed_exactly(imap, tag):
    with greeted(imap.port) as client:
        client.send(tag + b" NOOP\r\n")
        assert client.readline().startswith(tag + b" OK ")


BAD_TAGS = [b"a\x01b", b"a\x00b", b"a\rb", b"a\tb", b"a\x1bb", b"a(b",
            b"a)b", b"a{b", b"a%b", b"a*b", b'a"b', b"a\\b", b"a]b",
            b"a+b", b"+", b"*", b"a\x7fb", b"a\xc3\xa9b", b"\xff",
            b"%s%n%x%n", b""]


@pytest.mark.parametrize("tag", BAD_TAGS)
def test_bad_tags_get_an_untagged_bad_and_are_never_echoed(imap, tag):
    with greeted(imap.port) as client:
        client.send(tag + b" NOOP\r\n")
        reply = client.readline()
        assert re.fullmatch(rb"\* BAD [ -~]+\r\n", reply)
        assert not tag or tag not in reply[6:]
        assert command(client, b"ok NOOP").startswith(b"ok OK")


def test_a_login_with_a_bad_tag_is_not_executed(imap):
    with greeted(imap.port) as client:
        client.send(b"a( LOGIN user11 pw11\r\n")
        assert client.readline().startswith(b"* BAD ")
        assert command(client, b"c1 NOOP").startswith(b"c1 OK ")
    assert 'user="user11"' not in imap.log()


@pytest.mark.parametrize("line", [b"SELECT INBOX", b"STATUS INBOX (MESSAGES)",
                                  b"XID NIL", b"FOO"])
def test_unknown_commands_get_bad(imap, line):
    with greeted(imap.port) as client:
        reply = command(client, b"u1 " + line)
        assert reply.startswith(b"u1 BAD ") and b"LOGIN" in reply


@pytest.mark.parametrize("args, expected", [
    ([], b"CAPABILITY, NOOP, LOGIN, AUTHENTICATE, ID or LOGOUT"),
    (["--login_disabled"], b"CAPABILITY, NOOP, ID or LOGOUT")])
def test_the_valid_commands_named_are_those_allowed_now(
        perdition_factory, dovecot, args, expected):
    proxy = perdition_factory(args, "IMAP4", dovecot.imap_port)
    with greeted(proxy.port) as client:
        assert command(client, b"u1 FOO") == \
            b"u1 BAD Unknown command, expected %s\r\n" % expected


def test_too_many_errors_end_the_session(imap):
    """--max_errors (10 by default, as nginx's max_errors) counts failed
    logins and refused commands alike."""
    with greeted(imap.port) as client:
        assert login(client, b"bob", b"wrong").startswith(b"L1 NO ")
        for n in range(8):
            assert command(client, b"e%d FOO" % n).startswith(b"e%d BAD " % n)
        client.send(b"e9 NOOP extra\r\n")
        data = wait_for_eof(client)
        assert data.startswith(b"e9 BAD ")
        assert data.endswith(b"* BYE Too many errors\r\n")
    imap.wait_for_log("127.0.0.1: Too many errors")
    with greeted(imap.port) as other:
        assert login(other) == b"L1 OK You are so in\r\n"


@pytest.mark.parametrize("start", [
    b"u1 XFOO", b"u1( LOGIN", b"u1 LOGIN bob bobpw", b"u1 NOOP\0",
    b"u1 LOGIN {3+}\r\nbob bobpw", b'u1 LOGIN {3+}\r\nbob "bob\\pw"',
    b"u1 NOOP", b"u1 CAPABILITY", b"u1 LOGOUT"])
def test_a_refused_command_swallows_its_non_synchronising_literal(imap,
                                                                  start):
    """The literal is part of the refused command: its bytes must never
    be taken for a command of their own."""
    with greeted(imap.port) as client:
        client.send(start + b" {10+}\r\nu2 LOGOUT\r\nu3 NOOP\r\n")
        assert re.match(rb"(u1|\*) BAD ", client.readline())
        assert client.readline().startswith(b"u3 OK ")


@pytest.mark.parametrize("mechanism, answer", [(b"PLAIN", b"u1 BAD "),
                                               (b"CRAM-MD5", b"u1 NO ")])
def test_authenticate_swallows_its_non_synchronising_literal(imap, mechanism,
                                                             answer):
    with greeted(imap.port) as client:
        client.send(b"u1 AUTHENTICATE %s {10+}\r\nu2 LOGOUT\r\n"
                    b"u3 NOOP\r\n" % mechanism)
        assert client.readline().startswith(answer)
        assert client.readline().startswith(b"u3 OK ")


def test_login_disabled_asks_for_no_literal(perdition_factory, dovecot):
    proxy = perdition_factory(["--login_disabled"], "IMAP4",
                              dovecot.imap_port)
    with greeted(proxy.port) as client:
        assert command(client, b"d1 LOGIN {3}").startswith(b"d1 BAD ")
        assert command(client, b"d2 LOGIN bob bobpw").startswith(b"d2 BAD ")
    assert 'user="bob"' not in proxy.log()


@pytest.mark.parametrize("mechanism", [b"CRAM-MD5", b"LOGIN", b"XOAUTH2",
                                       b"SCRAM-SHA-256 biwsbj1ib2I="])
def test_other_mechanisms_are_refused_with_no(imap, mechanism):
    with greeted(imap.port) as client:
        assert command(client, b"a1 AUTHENTICATE " + mechanism) == \
            b"a1 NO Unsupported authentication mechanism\r\n"
        assert login(client) == b"L1 OK You are so in\r\n"


@pytest.mark.parametrize("arguments", [b"", b" bob", b" bob bobpw extra",
                                       b' "bob bobpw', b' bob "bob\\pw"',
                                       b" bob (bobpw)"])
def test_malformed_login_arguments_get_bad(imap, arguments):
    with greeted(imap.port) as client:
        assert command(client, b"m1 LOGIN" + arguments).startswith(
            b"m1 BAD ")
        assert login(client) == b"L1 OK You are so in\r\n"


# ---------------------------------------------------------------------------
# LOGIN: atoms, quoted strings and literals, on to the real server
# ---------------------------------------------------------------------------

def test_login_with_atoms(imap, dovecot):
    with greeted(imap.port) as client:
        assert command(client, b"x1 login alice alicepw") == \
            b"x1 OK You are so in\r\n"
        assert command(client, b"x2 SELECT INBOX").startswith(b"x2 OK ")
    log = imap.wait_for_log('Close: 127.0.0.1 user="alice"')
    assert (f'Auth: 127.0.0.1 user="alice" passwd="XXXXXX" '
            f'server="127.0.0.1" port="{dovecot.imap_port}" status=ok') in log
    assert "alicepw" not in log


def test_unquoted_login_arguments_as_dovecot_takes_them(imap):
    """'%', '*' and ']' are refused in tags, but Dovecot and the C perdition
    take them in an unquoted LOGIN argument, and so does perdition."""
    with greeted(imap.port) as client:
        assert command(client, b"x1 LOGIN erin%example.com p%w*d]x") == \
            b"x1 OK You are so in\r\n"
        assert command(client, b"x2 SELECT INBOX").startswith(b"x2 OK ")
    imap.wait_for_log('Auth: 127.0.0.1 user="erin%example.com" ')


def test_login_with_quoted_strings_and_escapes(imap):
    with greeted(imap.port) as client:
        assert login(client, b'"quoter"', b'"p a\\"s\\\\s"') == \
            b"L1 OK You are so in\r\n"
        assert command(client, b"x1 SELECT INBOX").startswith(b"x1 OK ")


def test_imaplib_quotes_a_password_with_space_quote_and_backslash(imap,
                                                                   dovecot):
    client = imap_connect(imap.port)
    assert client.login("quoter", dovecot.users["quoter"]) == \
        ("OK", [b"You are so in"])
    assert client.select("INBOX")[0] == "OK"
    client.logout()


def test_synchronising_literals_carry_utf8(imap):
    with greeted(imap.port) as client:
        client.send(b"s1 LOGIN {%d}\r\n" % len(JURGEN))
        assert client.readline().startswith(b"+ ")
        client.send(JURGEN + b" {%d}\r\n" % len(JURGEN_PW))
        assert client.readline().startswith(b"+ ")
        client.send(JURGEN_PW + b"\r\n")
        assert client.readline() == b"s1 OK You are so in\r\n"
        assert command(client, b"s2 SELECT INBOX").startswith(b"s2 OK ")
    imap.wait_for_log('Auth: 127.0.0.1 user="j\u00fcrgen" passwd="XXXXXX"')


def test_non_synchronising_literals_with_literal_plus(custom):
    wrong = JURGEN_PW.replace(b"\xc3\xb6", b"o")
    with greeted(custom.port, UNAME_GREETING) as client:
        for tag, password in ((b"s1", wrong), (b"s2", JURGEN_PW)):
            client.send(b"%s LOGIN {%d+}\r\n%s {%d+}\r\n%s\r\n" % (
                tag, len(JURGEN), JURGEN, len(password), password))
        client.send(b"s3 NOOP\r\n")
        assert client.readline().startswith(b"s1 NO ")
        assert client.readline() == b"s2 OK Come in\r\n"
        assert response(client, b"s3")[-1].startswith(b"s3 OK ")


def test_wrong_password_then_the_right_one(imap):
    client = imap_connect(imap.port)
    with pytest.raises(imaplib.IMAP4.error, match="Authentication failed"):
        client.login("user10", "wrong")
    assert client.login("user10", "pw10")[0] == "OK"
    assert client.select("INBOX") == ("OK", [b"0"])
    client.logout()
    lines = [line for line in imap.log().splitlines()
             if 'Auth: 127.0.0.1 user="user10"' in line]
    assert len(lines) == 2
    assert "status=failed" in lines[0] and lines[1].endswith("status=ok")


def test_crlf_in_a_literal_user_name_stays_one_command(scripted, backend):
    commands = []
    backend.reset(imap_server(commands=commands))
    user = b"bob\r\nX1 DELETE INBOX"
    with greeted(scripted.port) as client:
        client.send(b"s1 LOGIN {%d}\r\n" % len(user))
        assert client.readline().startswith(b"+ ")
        client.send(user + b" bobpw\r\n")
        assert client.readline() == b"s1 OK You are so in\r\n"
    backend.join(1)
    # The greeting names no capabilities: perdition asks (RFC 3501: no
    # LOGIN where LOGINDISABLED stands), then logs in with one command.
    assert [text.split(b" ")[1] for text, _ in commands] == \
        [b"CAPABILITY", b"LOGIN"]
    text, literals = commands[1]
    assert text.split(b" ")[1:3] == [b"LOGIN", b"{%d}" % len(user)]
    assert text.split(b" ")[3:] in ([b"bobpw"], [b'"bobpw"'])
    assert literals == [user]
    scripted.wait_for_log(r'user="bob\x0d\x0aX1 DELETE INBOX"')


def test_pipelined_commands_after_login_reach_the_server(imap):
    with greeted(imap.port) as client:
        client.send(b"p1 LOGIN bob bobpw\r\np2 SELECT INBOX\r\n"
                    b"p3 LOGOUT\r\n")
        assert client.readline() == b"p1 OK You are so in\r\n"
        lines = wait_for_eof(client).splitlines()
    assert [line.split()[:2] for line in lines if line[:1] != b"*"] == \
        [[b"p2", b"OK"], [b"p3", b"OK"]]
    assert any(line.endswith(b" EXISTS") for line in lines)
    assert lines[-2].startswith(b"* BYE")


def test_a_client_half_close_still_gets_the_last_reply(imap):
    """A client that sends LOGOUT and shuts its sending side at once still
    reads the server's answer: the end of its input reaches the server as
    a half-close, not as the end of the session."""
    with greeted(imap.port) as client:
        assert login(client, tag=b"h1") == b"h1 OK You are so in\r\n"
        client.send(b"h2 LOGOUT\r\n")
        client.sock.shutdown(socket.SHUT_WR)
        lines = wait_for_eof(client).splitlines()
    assert lines[0].startswith(b"* BYE") and lines[-1].startswith(b"h2 OK")


def test_ok_line(custom):
    with greeted(custom.port, UNAME_GREETING) as client:
        assert login(client, tag=b"o1") == b"o1 OK Come in\r\n"


def test_server_ok_line_passes_the_real_servers_line(server_line, dovecot):
    with RawClient(dovecot.imap_port) as direct:
        direct.readline()
        expected = login(direct, tag=b"t7")
    assert re.fullmatch(rb"t7 OK \[CAPABILITY IMAP4rev1 [^]]*\] Logged in"
                        rb"\r\n", expected)
    with greeted(server_line.port) as client:
        assert login(client, tag=b"t7") == expected


def test_big_message_byte_for_byte(imap, dovecot):
    message = big_message(BIG, seed=3)
    dovecot.add_message("user1", message)
    client = imap_connect(imap.port)
    client.login("user1", "pw1")
    assert client.select("INBOX") == ("OK", [b"1"])
    typ, data = client.fetch("1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == message
    client.logout()
    assert wait_for_closes(imap, "user1", 1)[0][1] > len(message)


def test_imaplib_session_select_fetch_store_expunge(imap, dovecot):
    messages = [b"Subject: number %d\r\n\r\nbody %d\r\n" % (n, n)
                for n in (1, 2, 3)]
    for message in messages:
        dovecot.add_message("user4", message)
    client = imap_connect(imap.port)
    client.login("user4", "pw4")
    assert client.select("INBOX") == ("OK", [b"3"])
    typ, data = client.fetch("1:3", "(BODY.PEEK[])")
    assert [part[1] for part in data if isinstance(part, tuple)] == messages
    typ, data = client.store("2", "+FLAGS", "(\\Deleted)")
    assert typ == "OK" and b"\\Deleted" in data[0]
    assert client.expunge() == ("OK", [b"2"])
    client.close()
    client.logout()
    direct = imap_connect(dovecot.imap_port)
    direct.login("user4", "pw4")
    assert direct.select("INBOX") == ("OK", [b"2"])
    typ, data = direct.fetch("1:2", "(BODY.PEEK[])")
    assert [part[1] for part in data if isinstance(part, tuple)] == \
        [messages[0], messages[2]]
    direct.logout()


def test_curl_lists_and_fetches_through_perdition(imap, dovecot):
    message = b"Subject: curl\r\n\r\nfetched by curl\r\n"
    dovecot.add_message("user5", message)
    listing = curl("-u", "user5:pw5", f"imap://127.0.0.1:{imap.port}/")
    assert listing == curl("-u", "user5:pw5",
                           f"imap://127.0.0.1:{dovecot.imap_port}/")
    assert b"INBOX" in listing
    assert curl("-u", "user5:pw5",
                f"imap://127.0.0.1:{imap.port}/INBOX;UID=1") == message


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("line", [b"n1 NOOP\0", b"n1 LOGIN al\0ice alicepw",
                                  b"n1 CAPA\0BILITY"])
def test_nul_byte_in_a_command(imap, line):
    with greeted(imap.port) as client:
        assert command(client, line).startswith(b"n1 BAD ")
        other = imap_connect(imap.port)
        assert other.login("bob", "bobpw")[0] == "OK"
        other.logout()
        assert login(client, b"alice", b"alicepw") == \
            b"L1 OK You are so in\r\n"
    assert "al\\x00ice" not in imap.log()


@pytest.mark.parametrize("size", [8200, 1024 * 1024])
def test_over_long_line(imap, size):
    errors = imap.log().count("Line too long")
    with greeted(imap.port) as client:
        client.send(b"a1 LOGIN " + b"x" * size + b" pw\r\n")
        imap.wait_for_log("Line too long", count=errors + 1)
        # What the client sends after the error is read and dropped, so
        # the connection is not reset before the client reads the error.
        client.send(b"NOOP\r\n" * 10000)
        assert wait_for_eof(client).startswith(b"* BYE ")
    other = imap_connect(imap.port)
    assert other.login("bob", "bobpw")[0] == "OK"
    other.logout()


@pytest.mark.parametrize("literal", [b"{5}", b"{5+}"])
def test_nul_byte_in_a_login_literal(imap, literal):
    """RFC 3501 literals carry no NUL: BAD, as in the line."""
    with greeted(imap.port) as client:
        client.send(b"n1 LOGIN " + literal + b"\r\n")
        if literal == b"{5}":
            assert client.readline().startswith(b"+ ")
        client.send(b"al\0ce alicepw\r\n")
        assert client.readline().startswith(b"n1 BAD ")
        assert login(client) == b"L1 OK You are so in\r\n"
    assert 'al\\x00ce' not in imap.log()


@pytest.mark.parametrize("verb", [b"NOOP", b"LOGIN", b"XFOO"])
def test_a_thousand_chained_literals_get_bad(imap, verb):
    """Skipping literals is a bounded loop: no recursion."""
    errors = imap.log().count("Traceback")
    with greeted(imap.port) as client:
        client.send(b"c1 " + verb + b" {0+}\r\n" + b"{0+}\r\n" * 1000
                    + b"x\r\n")
        assert client.readline().startswith(b"c1 BAD ")
        assert login(client) == b"L1 OK You are so in\r\n"
    assert imap.log().count("Traceback") == errors


def test_a_command_too_long_in_literals_ends_the_session(imap):
    with greeted(imap.port) as client:
        client.send(b"c1 NOOP {0+}\r\n" + b"{9+}\r\n123456789" * 10000
                    + b"x\r\n")
        assert wait_for_eof(client).endswith(b"* BYE Command too long\r\n")
    with greeted(imap.port) as other:
        assert login(other) == b"L1 OK You are so in\r\n"


def test_synchronising_literal_too_big_is_refused(imap):
    with greeted(imap.port) as client:
        assert command(client, b"b1 LOGIN {100000}").startswith(b"b1 BAD ")
        assert login(client) == b"L1 OK You are so in\r\n"


def test_non_synchronising_literal_too_big_ends_the_session(imap):
    with greeted(imap.port) as client:
        client.send(b"b1 LOGIN {100000+}\r\n" + b"x" * 100000 + b" pw\r\n")
        assert wait_for_eof(client).startswith(b"* BYE ")
    imap.wait_for_log("Literal too long")


# ---------------------------------------------------------------------------
# Failures of the real server
# ---------------------------------------------------------------------------

def test_unreachable_server_then_retry(perdition_factory):
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))     # bound, not listening: refused
    port = reserved.getsockname()[1]
    proxy = perdition_factory([], "IMAP4", port)
    with reserved, greeted(proxy.port) as client:
        assert login(client) == b"L1 NO Could not connect to server\r\n"
        proxy.wait_for_log('user="bob" passwd="XXXXXX" server="127.0.0.1" '
                           f'port="{port}" status=failed')
        reserved.close()
        with ScriptedBackend(imap_server(), port=port):
            assert login(client, tag=b"L2") == b"L2 OK You are so in\r\n"


@pytest.mark.parametrize("limit", [3, 0])
def test_max_errors_counts_failed_logins(perdition_factory, dovecot, limit):
    proxy = perdition_factory(["--max_errors", str(limit)], "IMAP4",
                              dovecot.imap_port)
    with greeted(proxy.port) as client:
        for n in range(2 if limit else 25):
            assert login(client, b"bob", b"wrong").startswith(b"L1 NO ")
        if limit:
            client.send(b"L3 LOGIN bob wrong\r\n")
            assert wait_for_eof(client) == \
                b"L3 NO Authentication failed\r\n* BYE Too many errors\r\n"
            proxy.wait_for_log("127.0.0.1: Too many errors")
        else:
            assert login(client) == b"L1 OK You are so in\r\n"


def test_server_greeting_like_perdition_is_a_loop(scripted, backend):
    commands = []
    backend.reset(imap_server(greeting=GREETING.rstrip(), commands=commands))
    with greeted(scripted.port) as client:
        assert login(client) == b"L1 NO Re-Authentication Failure\r\n"
        backend.join(1)
    assert commands == []
    scripted.wait_for_log("status=failed: Re-Authentication Failure")


def test_perdition_pointed_at_itself(tmp_path):
    proxy = Perdition([], "IMAP4", tmp_path)
    proxy.args += ["-s", f"127.0.0.1:{proxy.port}", "-M", ""]
    with proxy, greeted(proxy.port) as client:
        assert login(client) == b"L1 NO Re-Authentication Failure\r\n"
        assert command(client, b"n1 NOOP").startswith(b"n1 OK ")


def test_server_drops_mid_transfer(scripted, backend):
    half_a_message = b"* 1 FETCH (BODY[] {10000000}\r\n" + b"x" * 1000000
    fetch = b"f1 FETCH 1 BODY[]\r\n"
    backend.reset(imap_server(on_fetch=lambda peer: peer.send(half_a_message)))
    with greeted(scripted.port) as client:
        assert login(client, b"dropped", b"pw") == b"L1 OK You are so in\r\n"
        client.send(fetch)
        assert wait_for_eof(client) == half_a_message
    assert wait_for_closes(scripted, "dropped", 1) == \
        [(len(fetch), len(half_a_message))]
    backend.reset(imap_server())
    with greeted(scripted.port) as client:
        assert login(client) == b"L1 OK You are so in\r\n"


def test_client_gone_mid_transfer(imap, dovecot):
    message = big_message(BIG, seed=4)
    dovecot.add_message("user3", message)
    client = imap_connect(imap.port)    # once to the end: pipes warm up
    client.login("user3", "pw3")
    client.select("INBOX")
    assert client.fetch("1", "(BODY.PEEK[])")[1][0][1] == message
    client.logout()
    baseline = settled_usage(imap)
    count = len(closes(imap, "user3"))
    with greeted(imap.port) as client:
        assert login(client, b"user3", b"pw3") == b"L1 OK You are so in\r\n"
        assert command(client, b"s1 SELECT INBOX").startswith(b"s1 OK ")
        client.send(b"f1 FETCH 1 BODY.PEEK[]\r\n")
        receive_at_least(client, 1024 * 1024)
    wait_for_closes(imap, "user3", count + 1)
    other = imap_connect(imap.port)
    assert other.login("user3", "pw3")[0] == "OK"
    other.logout()
    wait_for_usage(imap, baseline)


def test_server_hangs_after_greeting(scripted, backend):
    def hang(peer):
        peer.send(b"* OK hanging\r\n")
        peer.read_to_end()

    backend.reset(hang)
    with greeted(scripted.port) as client:
        start = time.monotonic()
        reply = login(client)
        elapsed = time.monotonic() - start
        assert reply.startswith(b"L1 NO ") and 1.5 < elapsed < 6
        backend.reset(imap_server())
        assert login(client, tag=b"L2") == b"L2 OK You are so in\r\n"


def test_server_flooding_untagged_lines_fails_the_login(scripted, backend):
    """An answer is read up to a bounded number of lines, however fast
    they come."""
    def flood(peer):
        peer.send(b"* OK flooding\r\n")
        read_command(peer)
        try:
            for _ in range(100000):
                peer.send(b"* OK still not done\r\n")
        except OSError:
            pass

    backend.reset(flood)
    with greeted(scripted.port) as client:
        assert login(client).startswith(b"L1 NO ")
        backend.reset(imap_server())
        assert login(client, tag=b"L2") == b"L2 OK You are so in\r\n"
    scripted.wait_for_log("Server sent too many lines")


def test_idle_client_before_login_times_out(scripted):
    with greeted(scripted.port) as client:
        assert command(client, b"n1 NOOP").startswith(b"n1 OK ")
        start = time.monotonic()
        assert wait_for_eof(client).startswith(b"* BYE ")
        assert 1.5 < time.monotonic() - start < 6


def test_idle_timeout_after_login(perdition_factory, dovecot):
    proxy = perdition_factory(["-t", "2"], "IMAP4", dovecot.imap_port)
    with greeted(proxy.port) as client:
        assert login(client) == b"L1 OK You are so in\r\n"
        start = time.monotonic()
        assert wait_for_eof(client) == b""
        assert 1.5 < time.monotonic() - start < 6
    proxy.wait_for_log("idle timeout")
    proxy.wait_for_log('Close: 127.0.0.1 user="bob"')
