"""SASL PLAIN and IMAP ID (issue 10): IMAP AUTHENTICATE PLAIN with and
without the initial response (RFC 4959), POP3 AUTH PLAIN (RFC 5034), the
authorisation identity, AUTHENTICATE PLAIN / AUTH PLAIN towards a real
server that refuses LOGIN / USER, and ID before login (RFC 2971).

Dovecot is the real server (its auth_mechanisms are plain and login);
imaplib, curl and raw sockets are the clients.  What Dovecot cannot be
made to do -- refuse LOGIN while offering PLAIN, or show exactly what
perdition sent it -- comes from the shared scripted back-end.
"""

import base64
import imaplib
import re

import pytest

from helpers import Perdition, RawClient, imap_connect
from support import ScriptedBackend, curl, wait_for_eof


def b64(text):
    return base64.b64encode(text.encode()) or b"="


@pytest.fixture(scope="module")
def imap(workdir, dovecot):
    """perdition (IMAP4, logging its dialogue) in front of Dovecot."""
    with Perdition(["-d", "-C"], "IMAP4", workdir,
                   dovecot.imap_port) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def pop3(workdir, dovecot):
    with Perdition(["-d", "-C"], "POP3", workdir,
                   dovecot.pop3_port) as proxy:
        yield proxy


def greeted(port):
    client = RawClient(port)
    assert client.readline().startswith((b"* OK ", b"+OK "))
    return client


def tagged(client, tag):
    """The lines up to the one tagged *tag*; the last one."""
    while True:
        line = client.readline()
        assert line, "connection closed"
        if line.startswith(tag + b" "):
            return line


def command(client, line):
    client.send(line + b"\r\n")
    return tagged(client, line.split(b" ")[0])


# ---------------------------------------------------------------------------
# IMAP AUTHENTICATE PLAIN from the client
# ---------------------------------------------------------------------------

def test_imaplib_authenticate_plain(imap, dovecot):
    dovecot.add_message("user21", b"Subject: sasl\r\n\r\nby SASL\r\n")
    client = imap_connect(imap.port)
    assert "AUTH=PLAIN" in client.capabilities
    typ, _ = client.authenticate("PLAIN",
                                 lambda _: b"\0user21\0pw21")
    assert typ == "OK"
    assert client.select("INBOX") == ("OK", [b"1"])
    client.logout()
    log = imap.wait_for_log('Close: 127.0.0.1 user="user21"')
    assert ('Auth: 127.0.0.1 user="user21" passwd="XXXXXX" server='
            '"127.0.0.1" port="%d" status=ok' % dovecot.imap_port) in log
    assert "pw21" not in log and b64("\0user21\0pw21").decode() not in log


def test_curl_uses_sasl_ir_through_perdition(imap, dovecot):
    dovecot.add_message("user22", b"Subject: curl\r\n\r\nsasl-ir\r\n")
    offset = len(imap.log())
    assert b"INBOX" in curl("-u", "user22:pw22",
                            f"imap://127.0.0.1:{imap.port}/")
    log = imap.wait_for_log('Close: 127.0.0.1 user="user22"')[offset:]
    # curl sent its credentials in the AUTHENTICATE line itself: no
    # continuation was asked for or answered (the masked line would say
    # AUTHENTICATE XXXXXX for a bare "AUTHENTICATE PLAIN" too)
    assert re.search(r"client: \S+ AUTHENTICATE XXXXXX\n", log)
    assert "perdition: + " not in log and "client: XXXXXX" not in log
    assert "pw22" not in log and "\\x00" not in log


@pytest.mark.parametrize("form", ["initial", "continuation", "lower"])
def test_authenticate_plain_forms(imap, form):
    response = b64("\0user23\0pw23")
    with greeted(imap.port) as client:
        if form == "initial":
            answer = command(client, b"a1 AUTHENTICATE PLAIN " + response)
        else:
            verb = b"authenticate plain" if form == "lower" \
                else b"AUTHENTICATE PLAIN"
            client.send(b"a1 " + verb + b"\r\n")
            assert client.readline() == b"+ \r\n"
            client.send(response + b"\r\n")
            answer = tagged(client, b"a1")
        assert answer == b"a1 OK You are so in\r\n"
        assert command(client, b"a2 SELECT INBOX").startswith(b"a2 OK ")
    log = imap.wait_for_log('Close: 127.0.0.1 user="user23"')
    assert "pw23" not in log and response.decode() not in log


BAD_RESPONSES = [
    b"=",                               # an empty response
    b"not base64!",
    b"dXNlcjIz",                        # "user23": no NULs
    b64("user23\0pw23"),                # one NUL
    b64("\0\0pw23"),                    # no user
    b64("\0user23\0"),                  # no password
    b64("a\0user23\0pw23\0x"),          # three NULs
]


@pytest.mark.parametrize("form, response", [
    ("continuation", b"*")] + [         # '*' cancels the exchange
    (form, response) for form in ("initial", "continuation")
    for response in BAD_RESPONSES])
def test_bad_sasl_responses_get_bad(imap, response, form):
    with greeted(imap.port) as client:
        if form == "initial":
            answer = command(client, b"a1 AUTHENTICATE PLAIN " + response)
        else:
            client.send(b"a1 AUTHENTICATE PLAIN\r\n")
            assert client.readline() == b"+ \r\n"
            client.send(response + b"\r\n")
            answer = tagged(client, b"a1")
        assert answer.startswith(b"a1 BAD "), answer
        assert command(client, b"a2 LOGIN user24 pw24") == \
            b"a2 OK You are so in\r\n"


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
@pytest.mark.parametrize("form, response, error", [
    # RFC 4959 and RFC 5034: "=" is an empty initial response
    ("initial", b"=", b"Invalid SASL PLAIN message"),
    # an empty line is an empty response to the challenge
    ("continuation", b"", b"Invalid SASL PLAIN message"),
    ("continuation", b"not base64!", b"Invalid base64 in SASL response"),
    ("initial", b"not-base64!", b"Invalid base64 in SASL response"),
])
def test_empty_response_is_an_invalid_message_not_invalid_base64(
        imap, pop3, protocol, form, response, error):
    """An empty response is well-formed base64 of an empty PLAIN message,
    which lacks the user and password; the client is told that, not that
    its base64 is broken."""
    proxy = imap if protocol == "IMAP4" else pop3
    verb = b"a1 AUTHENTICATE PLAIN" if protocol == "IMAP4" \
        else b"AUTH PLAIN"
    with greeted(proxy.port) as client:
        if form == "initial":
            client.send(verb + b" " + response + b"\r\n")
        else:
            client.send(verb + b"\r\n")
            assert client.readline() == b"+ \r\n"
            client.send(response + b"\r\n")
        answer = client.readline()
    if protocol == "IMAP4":
        assert answer == b"a1 BAD " + error + b"\r\n"
    else:
        assert answer == b"-ERR " + error + b"\r\n"


def test_wrong_password_then_the_right_one(imap):
    with greeted(imap.port) as client:
        assert command(client, b"a1 AUTHENTICATE PLAIN " +
                       b64("\0user25\0wrong")).startswith(b"a1 NO ")
        assert command(client, b"a2 AUTHENTICATE PLAIN " +
                       b64("user25\0user25\0pw25")) == \
            b"a2 OK You are so in\r\n"
    log = imap.wait_for_log('Close: 127.0.0.1 user="user25"')
    assert log.count('Auth: 127.0.0.1 user="user25"') == 2


@pytest.mark.parametrize("args, before_tls", [
    (["--login_disabled"], False), (["--ssl_mode", "tls_listen_force"], True)])
def test_no_sasl_where_no_login(perdition_factory, dovecot, args,
                                before_tls):
    if before_tls:      # Dovecot's certificate will do for listening
        args = args + ["--ssl_cert_file", dovecot.cert_file,
                       "--ssl_key_file", dovecot.key_file]
    proxy = perdition_factory(args, "IMAP4", dovecot.imap_port)
    with greeted(proxy.port) as client:
        client.send(b"c1 CAPABILITY\r\n")
        caps = client.readline()
        assert b"LOGINDISABLED" in caps and b"AUTH=PLAIN" not in caps \
            and b"SASL-IR" not in caps
        tagged(client, b"c1")
        assert command(client, b"a1 AUTHENTICATE PLAIN " +
                       b64("\0user26\0pw26")).startswith(b"a1 BAD Login")
    assert 'user="user26"' not in proxy.log()


# ---------------------------------------------------------------------------
# POP3 AUTH PLAIN from the client
# ---------------------------------------------------------------------------

def pop3_line(client, line):
    client.send(line + b"\r\n")
    return client.readline()


def test_pop3_bare_auth_lists_plain(pop3):
    with greeted(pop3.port) as client:
        client.send(b"AUTH\r\n")
        assert client.read_until(b"\r\n.\r\n") == b"+OK\r\nPLAIN\r\n.\r\n"
        assert pop3_line(client, b"AUTH CRAM-MD5") == \
            b"-ERR Unsupported authentication mechanism\r\n"


@pytest.mark.parametrize("form", ["initial", "continuation", "lower"])
def test_pop3_auth_plain_forms(pop3, form):
    response = b64("\0user27\0pw27")
    with greeted(pop3.port) as client:
        if form == "initial":
            answer = pop3_line(client, b"AUTH PLAIN " + response)
        else:
            assert pop3_line(client, b"auth plain" if form == "lower"
                             else b"AUTH PLAIN") == b"+ \r\n"
            answer = pop3_line(client, response)
        assert answer == b"+OK You are so in\r\n"
        assert pop3_line(client, b"STAT").startswith(b"+OK ")
    log = pop3.wait_for_log('Close: 127.0.0.1 user="user27"')
    assert "pw27" not in log and response.decode() not in log


@pytest.mark.parametrize("response", [b"*", b"=", b"%%%", b64("x\0y"),
                                      b64("\0user28\0")])
def test_pop3_bad_sasl_responses(pop3, response):
    with greeted(pop3.port) as client:
        assert pop3_line(client, b"AUTH PLAIN") == b"+ \r\n"
        assert pop3_line(client, response).startswith(b"-ERR ")
        if response != b"*":
            assert pop3_line(client, b"AUTH PLAIN " + response) \
                .startswith(b"-ERR ")
        assert pop3_line(client, b"AUTH PLAIN " + b64("\0user28\0pw28")) \
            == b"+OK You are so in\r\n"


# ---------------------------------------------------------------------------
# Towards the real server
# ---------------------------------------------------------------------------

def imap_backend(capabilities, commands, accept=b"OK",
                 second_challenge=False):
    """A scripted IMAP server greeting with *capabilities*; it keeps each
    command (with its continuation lines) in *commands*.  With
    *second_challenge* it answers the PLAIN response with another '+'
    challenge and then only listens."""
    def script(peer):
        peer.send(b"* OK [CAPABILITY %s] scripted\r\n" % capabilities)
        while True:
            line = peer.readline().rstrip(b"\r\n")
            commands.append(line)
            tag, _, rest = line.partition(b" ")
            if rest.upper() == b"AUTHENTICATE PLAIN":
                peer.send(b"+ \r\n")
                commands.append(peer.readline().rstrip(b"\r\n"))
            if second_challenge and \
                    rest.upper().startswith(b"AUTHENTICATE PLAIN"):
                peer.send(b"+ bW9yZQ==\r\n")
                while True:     # until perdition closes: EOFError
                    commands.append(peer.readline().rstrip(b"\r\n"))
            if rest.upper().startswith(b"LOGOUT"):
                peer.send(b"* BYE\r\n%s OK bye\r\n" % tag)
                return
            peer.send(b"%s %s done\r\n" % (tag, accept))
    return script


def pop3_backend(capa, commands, refuse_user=False):
    def script(peer):
        peer.send(b"+OK scripted\r\n")
        while True:
            line = peer.readline().rstrip(b"\r\n")
            commands.append(line)
            verb = line.split(b" ")[0].upper()
            if verb == b"CAPA":
                peer.send(b"+OK\r\n" + b"".join(c + b"\r\n" for c in capa)
                          + b".\r\n")
            elif verb == b"AUTH" and line.upper() == b"AUTH PLAIN":
                peer.send(b"+ \r\n")
                commands.append(peer.readline().rstrip(b"\r\n"))
                peer.send(b"+OK in\r\n")
            elif verb == b"USER" and refuse_user:
                peer.send(b"-ERR [AUTH] Plaintext authentication "
                          b"disallowed\r\n")
            elif verb == b"QUIT":
                peer.send(b"+OK bye\r\n")
                return
            else:
                peer.send(b"+OK\r\n")
    return script


@pytest.mark.parametrize("capabilities, expected", [
    (b"IMAP4rev1 LOGINDISABLED AUTH=PLAIN SASL-IR",
     [b"P1 AUTHENTICATE PLAIN " + b64("\0bob\0bobpw")]),
    (b"IMAP4rev1 LOGINDISABLED AUTH=PLAIN",
     [b"P1 AUTHENTICATE PLAIN", b64("\0bob\0bobpw")]),
])
def test_imap_server_with_logindisabled_gets_authenticate_plain(
        perdition_factory, capabilities, expected):
    commands = []
    with ScriptedBackend(imap_backend(capabilities, commands)) as backend:
        proxy = perdition_factory(["-d", "-C"], "IMAP4", backend.port)
        client = imap_connect(proxy.port)
        assert client.login("bob", "bobpw")[0] == "OK"
        client.logout()
        backend.join(1)
    assert commands[:len(expected)] == expected
    log = proxy.wait_for_log('Close: 127.0.0.1 user="bob"')
    assert "bobpw" not in log and expected[-1].decode()[-8:] not in log
    assert re.search(r"to server: P1 AUTHENTICATE XXXXXX\n", log) or \
        "to server: XXXXXX" in log


@pytest.mark.parametrize("capabilities, expected", [
    (b"IMAP4rev1 LOGINDISABLED AUTH=PLAIN SASL-IR",
     [b"P1 AUTHENTICATE PLAIN " + b64("\0bob\0bobpw")]),
    (b"IMAP4rev1 LOGINDISABLED AUTH=PLAIN",
     [b"P1 AUTHENTICATE PLAIN", b64("\0bob\0bobpw")]),
])
def test_imap_server_asking_a_second_challenge_fails_the_login(
        perdition_factory, capabilities, expected):
    """PLAIN has one step: a real server that asks for more after the
    response gets nothing more; the client is told no and may go on."""
    commands = []
    with ScriptedBackend(imap_backend(capabilities, commands,
                                      second_challenge=True)) as backend:
        proxy = perdition_factory([], "IMAP4", backend.port)
        with greeted(proxy.port) as client:
            assert command(client, b"a LOGIN bob bobpw") == \
                b"a NO Authentication failed\r\n"
            assert command(client, b"b NOOP") == b"b OK NOOP completed\r\n"
        backend.join(1)
    assert commands[:len(expected)] == expected
    # nothing after, but perhaps a "*" that cancels the exchange
    assert commands[len(expected):] in ([], [b"*"])
    log = proxy.wait_for_log('Close: 127.0.0.1 user="bob"')
    assert re.search(r'Auth: 127\.0\.0\.1 user="bob" .* status=failed: '
                     r"AUTHENTICATE: an unexpected continuation\n", log), log


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_an_authorisation_identity_equal_to_the_user_is_none(
        perdition_factory, protocol):
    """RFC 4616: an authzid that names the user itself asks for nothing
    more, so a server that takes only LOGIN or USER/PASS will do."""
    commands = []
    script = imap_backend(b"IMAP4rev1", commands) if protocol == "IMAP4" \
        else pop3_backend([b"USER"], commands)
    with ScriptedBackend(script) as backend:
        proxy = perdition_factory([], protocol, backend.port)
        response = b64("bob\0bob\0bobpw")
        with greeted(proxy.port) as client:
            if protocol == "IMAP4":
                assert command(client, b"a AUTHENTICATE PLAIN " +
                               response) == b"a OK You are so in\r\n"
            else:
                assert pop3_line(client, b"AUTH PLAIN " + response) == \
                    b"+OK You are so in\r\n"
    if protocol == "IMAP4":
        assert commands[0] == b'P1 LOGIN "bob" "bobpw"'
    else:
        assert commands[:2] == [b"USER bob", b"PASS bobpw"]


def test_imap_server_with_logindisabled_and_no_plain_is_a_failure(
        perdition_factory):
    commands = []
    with ScriptedBackend(imap_backend(b"IMAP4rev1 LOGINDISABLED",
                                      commands)) as backend:
        proxy = perdition_factory([], "IMAP4", backend.port)
        with greeted(proxy.port) as client:
            assert command(client, b"a LOGIN bob bobpw").startswith(b"a NO ")
    assert not any(b"bobpw" in c or b"AUTHENTICATE" in c for c in commands)


@pytest.mark.parametrize("capabilities", [b"IMAP4rev1 AUTH=PLAIN SASL-IR",
                                          b"IMAP4rev1"])
def test_imap_authorisation_identity(perdition_factory, capabilities):
    """An authzid other than the user reaches a server that takes PLAIN
    and is refused where perdition would have to use LOGIN."""
    commands = []
    with ScriptedBackend(imap_backend(capabilities, commands)) as backend:
        proxy = perdition_factory([], "IMAP4", backend.port)
        with greeted(proxy.port) as client:
            answer = command(client, b"a AUTHENTICATE PLAIN " +
                             b64("admin\0bob\0bobpw"))
    if b"AUTH=PLAIN" in capabilities:
        assert answer == b"a OK You are so in\r\n"
        assert commands[0] == b"P1 AUTHENTICATE PLAIN " + \
            b64("admin\0bob\0bobpw")
    else:
        assert answer == b"a NO Authorisation identity not supported\r\n"
        assert not any(b"LOGIN" in c for c in commands)


@pytest.mark.parametrize("capa, refuse_user, expected", [
    # CAPA before STLS is not read: USER first, refused, then CAPA
    ([b"SASL PLAIN LOGIN"], True,
     [b"USER bob", b"CAPA", b"AUTH PLAIN " + b64("\0bob\0bobpw")]),
    # a server that takes USER gets USER and PASS, as today
    ([b"USER", b"SASL PLAIN"], False, [b"USER bob", b"PASS bobpw"]),
])
def test_pop3_server_without_user_gets_auth_plain(perdition_factory, capa,
                                                  refuse_user, expected):
    commands = []
    with ScriptedBackend(pop3_backend(capa, commands,
                                      refuse_user)) as backend:
        proxy = perdition_factory([], "POP3", backend.port)
        with greeted(proxy.port) as client:
            assert pop3_line(client, b"USER bob").startswith(b"+OK")
            assert pop3_line(client, b"PASS bobpw") == \
                b"+OK You are so in\r\n"
    assert commands[:len(expected)] == expected


@pytest.mark.parametrize("capa", [[b"SASL PLAIN"], [b"USER"]])
def test_pop3_authorisation_identity(perdition_factory, capa):
    commands = []
    with ScriptedBackend(pop3_backend(capa, commands)) as backend:
        proxy = perdition_factory([], "POP3", backend.port)
        with greeted(proxy.port) as client:
            answer = pop3_line(client, b"AUTH PLAIN " +
                               b64("admin\0bob\0bobpw"))
    if capa == [b"SASL PLAIN"]:
        assert answer == b"+OK You are so in\r\n"
        assert commands[:2] == [b"CAPA", b"AUTH PLAIN " +
                                b64("admin\0bob\0bobpw")]
    else:
        assert answer == b"-ERR Authorisation identity not supported\r\n"
        assert commands == [b"CAPA"]


def test_pop3_long_response_goes_on_a_continuation(perdition_factory):
    """RFC 5034: no AUTH line longer than 255 octets."""
    commands = []
    password = "p" * 300
    with ScriptedBackend(pop3_backend([b"SASL PLAIN"], commands)) as backend:
        proxy = perdition_factory([], "POP3", backend.port)
        with greeted(proxy.port) as client:
            assert pop3_line(client, b"AUTH PLAIN " +
                             b64("admin\0bob\0" + password)) == \
                b"+OK You are so in\r\n"
    assert commands[1:3] == [b"AUTH PLAIN", b64("admin\0bob\0" + password)]


# ---------------------------------------------------------------------------
# The dialogue log
# ---------------------------------------------------------------------------

def test_every_sasl_line_is_masked_in_the_dialogue(imap, pop3):
    secret = "s3cret-sasl"
    lines = [
        (imap, b"a1 AUTHENTICATE PLAIN " + b64("\0user29\0" + secret),
         b"a1 NO "),
        (imap, b"a2 authenticate plain " + b64("\0user29\0" + secret),
         b"a2 NO "),
        (pop3, b"AUTH PLAIN " + b64("\0user29\0" + secret), b"-ERR "),
        (pop3, b"auth  plain  " + b64("\0user29\0" + secret), b"-ERR "),
    ]
    for proxy, line, answer in lines:
        with greeted(proxy.port) as client:
            assert (command(client, line) if proxy is imap
                    else pop3_line(client, line)).startswith(answer)
    for proxy, verb in ((imap, b"a3 AUTHENTICATE PLAIN"),
                        (pop3, b"AUTH PLAIN")):
        with greeted(proxy.port) as client:
            client.send(verb + b"\r\n")
            assert client.readline() == b"+ \r\n"
            client.send(b64("\0user29\0" + secret) + b"\r\n")
            assert client.readline().startswith((b"a3 NO ", b"-ERR "))
    for proxy in (imap, pop3):
        log = proxy.wait_for_log('user="user29"', count=3)
        assert secret not in log
        assert b64("\0user29\0" + secret).decode() not in log
        assert "client: XXXXXX" in log
        # Dovecot was told, and its answer logged, without the secret
        assert "AUTHENTICATE XXXXXX" in log or "PASS XXXXXX" in log or \
            "LOGIN XXXXXX" in log


# ---------------------------------------------------------------------------
# IMAP ID (RFC 2971)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("arguments", [
    b"NIL", b"nil", b"()", b'("name" "Thunderbird" "version" "115.0")',
    b'("name" NIL)', b'("name" {11+}\r\nThunderbird)',
    b"(" + b" ".join(b'"k%d" "v"' % n for n in range(30)) + b")",
    b'("%s" "%s")' % (b"k" * 30, b"v" * 1024)])
def test_id_before_login(imap, arguments):
    with greeted(imap.port) as client:
        client.send(b"i1 ID " + arguments + b"\r\n")
        assert client.readline() == b'* ID ("name" "perdition")\r\n'
        assert client.readline() == b"i1 OK ID completed\r\n"
        assert command(client, b"L LOGIN user30 pw30") == \
            b"L OK You are so in\r\n"


@pytest.mark.parametrize("arguments", [
    b"", b"FOO", b'("name")', b'("name" "x"', b'"name" "x"', b"NIL extra",
    b'("name" "x")extra', b'(name "x")',
    b"(" + b" ".join(b'"k%d" "v"' % n for n in range(31)) + b")",
    b'("%s" "v")' % (b"k" * 31), b'("k" "%s")' % (b"v" * 1025),
    b'("k" {1025+}\r\n' + b"v" * 1025 + b")"])
def test_id_out_of_bounds_or_malformed_gets_bad(imap, arguments):
    with greeted(imap.port) as client:
        client.send(b"i1 ID " + arguments + b"\r\n")
        assert client.readline().startswith(b"i1 BAD ")
        assert command(client, b"i2 NOOP").startswith(b"i2 OK ")


def test_imaplib_id_and_capability(imap):
    client = imap_connect(imap.port)
    assert "ID" in client.capabilities
    typ, data = client.xatom("ID", '("name" "imaplib")')
    assert typ == "OK"
    assert client.untagged_responses.get("ID") == [b'("name" "perdition")']
    client.logout()


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_sasl_user_names_are_rewritten_like_login_ones(perdition_factory,
                                                       dovecot, protocol):
    """The SASL user takes the way of LOGIN's: here --strip_domain
    remote_login makes user31@example.com the real server's user31."""
    proxy = perdition_factory(
        ["--strip_domain", "remote_login"], protocol,
        dovecot.imap_port if protocol == "IMAP4" else dovecot.pop3_port)
    response = b64("\0user31@example.com\0pw31")
    with greeted(proxy.port) as client:
        if protocol == "IMAP4":
            answer = command(client, b"a AUTHENTICATE PLAIN " + response)
            assert answer == b"a OK You are so in\r\n"
        else:
            assert pop3_line(client, b"AUTH PLAIN " + response) == \
                b"+OK You are so in\r\n"
    proxy.wait_for_log('Auth: 127.0.0.1 user="user31@example.com" '
                       'passwd="XXXXXX" server="127.0.0.1"')


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_log_passwd_always_shows_the_sasl_password(perdition_factory,
                                                   dovecot, protocol):
    """The --log_passwd rules hold for SASL as for LOGIN and PASS."""
    proxy = perdition_factory(
        ["-d", "-C", "--log_passwd", "always"], protocol,
        dovecot.imap_port if protocol == "IMAP4" else dovecot.pop3_port)
    response = b64("\0user32\0pw32")
    with greeted(proxy.port) as client:
        if protocol == "IMAP4":
            assert command(client, b"a AUTHENTICATE PLAIN " + response) == \
                b"a OK You are so in\r\n"
        else:
            assert pop3_line(client, b"AUTH PLAIN " + response) == \
                b"+OK You are so in\r\n"
    log = proxy.wait_for_log('Auth: 127.0.0.1 user="user32" passwd="pw32" ')
    assert response.decode() in log and "XXXXXX" not in log
