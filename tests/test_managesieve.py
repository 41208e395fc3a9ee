"""ManageSieve (RFC 5804) through perdition (issue 10): the real client
sieve-connect uploads, lists, fetches and deletes a script on Dovecot's
ManageSieve server through perdition, in plaintext and with STARTTLS on
either side; a wrong password fails cleanly; raw sockets check the
greeting, the commands before login and the SASL forms.
"""

import base64
import os
import ssl
import subprocess
import sys

import pytest

from helpers import PERDITION, Perdition, RawClient, TIMEOUT
from support import ScriptedBackend, wait_for_eof

sys.path.insert(0, os.path.dirname(PERDITION))
import perdition  # noqa: E402

SCRIPT = b'require "fileinto";\nif header :contains "subject" "x" ' \
    b'{ fileinto "INBOX"; }\n'


def b64(text):
    return base64.b64encode(text.encode())


@pytest.fixture(scope="module")
def sieve(workdir, dovecot):
    with Perdition(["-d", "-C"], "MANAGESIEVE", workdir,
                   dovecot.sieve_port) as proxy:
        yield proxy


def tls_args(dovecot, mode):
    """Dovecot's certificate (localhost, 127.0.0.1) serves perdition's
    listening side and is the CA for its outgoing side."""
    return ["--ssl_mode", mode, "--ssl_cert_file", dovecot.cert_file,
            "--ssl_key_file", dovecot.key_file,
            "--ssl_ca_file", dovecot.cert_file]


def sieve_connect(port, user, password, *args, ca_file=None):
    """sieve-connect, with --nosrv: without it every run first asks the
    machine's resolver for _sieve._tcp.127.0.0.1, off the loopback, and
    waits as long as the resolver takes to answer."""
    command = ["sieve-connect", "--nosrv", "--server", "127.0.0.1",
               "--port", str(port), "--user", user, "--passwordfd", "0"]
    command += ["--tlscafile", ca_file] if ca_file else ["--clearchan"]
    return subprocess.run(command + [str(a) for a in args],
                          input=password + "\n", capture_output=True,
                          text=True, timeout=TIMEOUT + 10)


def greeting(client):
    """The capability lines up to the OK line."""
    lines = []
    while True:
        line = client.readline()
        assert line, lines
        lines.append(line)
        if not line.startswith(b'"'):
            return lines


def script_round_trip(port, user, password, tmp_path, ca_file=None):
    local = tmp_path / "filter.siv"
    local.write_bytes(SCRIPT)
    fetched = tmp_path / "fetched.siv"
    run = sieve_connect(port, user, password, "--localsieve", local,
                        "--remotesieve", "filter", "--upload",
                        ca_file=ca_file)
    assert run.returncode == 0, run.stderr
    listing = sieve_connect(port, user, password, "--list", ca_file=ca_file)
    assert listing.returncode == 0 and '"filter"' in listing.stdout, \
        listing.stderr
    run = sieve_connect(port, user, password, "--remotesieve", "filter",
                        "--localsieve", fetched, "--download",
                        ca_file=ca_file)
    assert run.returncode == 0, run.stderr
    assert fetched.read_bytes() == SCRIPT
    run = sieve_connect(port, user, password, "--remotesieve", "filter",
                        "--delete", ca_file=ca_file)
    assert run.returncode == 0, run.stderr
    listing = sieve_connect(port, user, password, "--list", ca_file=ca_file)
    assert listing.returncode == 0 and "filter" not in listing.stdout


def test_sieve_connect_manages_scripts_through_perdition(sieve, dovecot,
                                                         tmp_path):
    script_round_trip(sieve.port, "user40", "pw40", tmp_path)
    # The script is where Dovecot keeps user40's: it went all the way.
    log = sieve.wait_for_log('Close: 127.0.0.1 user="user40"', count=5)
    assert ('Auth: 127.0.0.1 user="user40" passwd="XXXXXX" server='
            '"127.0.0.1" port="%d" status=ok' % dovecot.sieve_port) in log
    assert "pw40" not in log and b64("\0user40\0pw40").decode() not in log


@pytest.mark.parametrize("mode", ["tls_listen", "tls_all", "tls_all_force"])
def test_sieve_connect_with_starttls(perdition_factory, dovecot, tmp_path,
                                     mode):
    """STARTTLS from sieve-connect to perdition, and with tls_all from
    perdition to Dovecot too (capabilities read again inside TLS)."""
    proxy = perdition_factory(["-d", "-C"] + tls_args(dovecot, mode),
                              "MANAGESIEVE", dovecot.sieve_port)
    script_round_trip(proxy.port, "user41", "pw41", tmp_path,
                      ca_file=dovecot.cert_file)
    log = proxy.wait_for_log('Close: 127.0.0.1 user="user41"', count=5)
    assert "client: STARTTLS" in log
    assert ("to server: STARTTLS" in log) == (mode != "tls_listen")


def test_wrong_password_fails_cleanly(sieve):
    run = sieve_connect(sieve.port, "user42", "wrong", "--list")
    assert run.returncode != 0
    log = sieve.wait_for_log('Close: 127.0.0.1 user="user42"')
    assert 'Auth: 127.0.0.1 user="user42" passwd="XXXXXX"' in log
    assert "status=failed" in log


def test_greeting_is_the_capability_response(sieve):
    with RawClient(sieve.port) as client:
        lines = greeting(client)
        assert lines[0] == b'"IMPLEMENTATION" "perdition"\r\n'
        assert b'"SASL" "PLAIN"\r\n' in lines
        assert b'"STARTTLS"\r\n' not in lines     # no tls_listen here
        assert lines[-1].startswith(b'OK "ManageSieve Ready ')
        client.send(b"CAPABILITY\r\n")
        assert greeting(client)[:-1] == lines[:-1]
        client.send(b'NOOP "STARTTLS-SYNC-42"\r\n')
        assert client.readline() == b'OK (TAG "STARTTLS-SYNC-42") "Done"\r\n'
        client.send(b"noop\r\n")
        assert client.readline() == b'OK "Done"\r\n'
        for line in (b"LISTSCRIPTS", b'PUTSCRIPT "x" {3+}\r\nabc',
                     b"STARTTLS", b"", b"CAPABILITY x"):
            client.send(line + b"\r\n")
            assert client.readline().startswith(b'NO "'), line
        client.send(b'AUTHENTICATE "DIGEST-MD5"\r\n')
        assert client.readline() == \
            b'NO "Unsupported authentication mechanism"\r\n'
        client.send(b"LOGOUT\r\n")
        assert client.readline() == b'OK "Logout completed."\r\n'


@pytest.mark.parametrize("form", ["quoted", "literal", "continuation",
                                  "continuation literal"])
def test_authenticate_plain_forms(sieve, form):
    response = b64("\0user43\0pw43")
    with RawClient(sieve.port) as client:
        greeting(client)
        if form == "quoted":
            client.send(b'AUTHENTICATE "PLAIN" "%s"\r\n' % response)
        elif form == "literal":
            client.send(b'Authenticate "plain" {%d+}\r\n%s\r\n'
                        % (len(response), response))
        else:
            client.send(b'AUTHENTICATE "PLAIN"\r\n')
            assert client.readline() == b'""\r\n'
            client.send(b'"%s"\r\n' % response if form == "continuation"
                        else b"{%d+}\r\n%s\r\n" % (len(response), response))
        assert client.readline() == b'OK "You are so in"\r\n'
        client.send(b"LISTSCRIPTS\r\n")
        assert client.readline().startswith(b"OK ")
    log = sieve.wait_for_log('Close: 127.0.0.1 user="user43"')
    assert "pw43" not in log and response.decode() not in log


@pytest.mark.parametrize("response", [b'"*"', b'""', b'"not base64"',
                                      b'"%s"' % b64("user44\0pw44")])
def test_bad_sasl_responses_get_no(sieve, response):
    with RawClient(sieve.port) as client:
        greeting(client)
        client.send(b'AUTHENTICATE "PLAIN"\r\n')
        assert client.readline() == b'""\r\n'
        client.send(response + b"\r\n")
        assert client.readline().startswith(b'NO "')
        client.send(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64("\0user44\0pw44"))
        assert client.readline() == b'OK "You are so in"\r\n'


@pytest.mark.parametrize("form", ["continuation", "initial"])
def test_empty_response_is_an_invalid_plain_message(sieve, form):
    """An empty string is the base64 of an empty message, which lacks the
    user and password: the client is told so, not that its base64 is
    wrong, which it is for a string that is no base64 at all."""
    with RawClient(sieve.port) as client:
        greeting(client)
        for response, error in ((b'""', b"Invalid SASL PLAIN message"),
                                (b'"not base64"',
                                 b"Invalid base64 in SASL response")):
            if form == "initial":
                client.send(b'AUTHENTICATE "PLAIN" %s\r\n' % response)
            else:
                client.send(b'AUTHENTICATE "PLAIN"\r\n')
                assert client.readline() == b'""\r\n'
                client.send(response + b"\r\n")
            assert client.readline() == b'NO "%s"\r\n' % error


def test_login_disabled_lists_an_empty_sasl(perdition_factory, dovecot):
    """RFC 5804 section 1.7: SASL is always listed, empty where no
    mechanism may be used now."""
    proxy = perdition_factory(["--login_disabled"], "MANAGESIEVE",
                              dovecot.sieve_port)
    with RawClient(proxy.port) as client:
        lines = greeting(client)
        assert [line for line in lines if line.startswith(b'"SASL"')] == \
            [b'"SASL" ""\r\n']
        client.send(b"CAPABILITY\r\n")
        assert greeting(client)[:-1] == lines[:-1]
        client.send(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64("\0user47\0pw47"))
        assert client.readline() == b'NO "Login disabled"\r\n'
    assert 'user="user47"' not in proxy.log()


def sieve_server(context, before, inside):
    """A ManageSieve server that offers STARTTLS and whose "SASL" line is
    *before* before TLS and *inside* inside it."""
    def capabilities(sasl):
        return (b'"IMPLEMENTATION" "scripted"\r\n"SASL" "%s"\r\n'
                b'"VERSION" "1.0"\r\n' % sasl)

    def script(peer):
        peer.send(capabilities(before) + b'"STARTTLS"\r\nOK "ready"\r\n')
        while True:
            verb = peer.readline().split(b" ")[0].strip().upper()
            if verb == b"STARTTLS":
                peer.send(b'OK "Begin TLS negotiation now."\r\n')
                peer.start_tls(context)
                peer.send(capabilities(inside) +
                          b'OK "TLS negotiation successful."\r\n')
            elif verb == b"LOGOUT":
                peer.send(b'OK "Logout completed."\r\n')
                return
            else:
                peer.send(b'OK "done"\r\n')
    return script


@pytest.mark.parametrize("before, inside, works", [
    (b"PLAIN LOGIN", b"", False),
    (b"", b"PLAIN", True),
])
def test_server_sasl_inside_tls_is_what_counts(perdition_factory, dovecot,
                                               before, inside, works):
    """With tls_outgoing perdition reads the real server's capabilities
    again inside TLS and forgets those said before: PLAIN offered only
    before TLS gets no AUTHENTICATE, PLAIN offered only inside it is
    used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(dovecot.cert_file, dovecot.key_file)
    with ScriptedBackend(sieve_server(context, before, inside)) as backend:
        proxy = perdition_factory(tls_args(dovecot, "tls_outgoing"),
                                  "MANAGESIEVE", backend.port)
        with RawClient(proxy.port) as client:
            greeting(client)
            client.send(b'AUTHENTICATE "PLAIN" "%s"\r\n'
                        % b64("\0user48\0pw48"))
            answer = client.readline()
            client.send(b"LOGOUT\r\n")
            assert client.readline() == b'OK "Logout completed."\r\n'
        backend.join(1)
    [peer] = backend.peers
    assert b"STARTTLS" in peer.received and peer.cipher
    if works:
        assert answer == b'OK "You are so in"\r\n'
        assert b'AUTHENTICATE "PLAIN" "%s"' % b64("\0user48\0pw48") \
            in peer.secure
    else:
        assert answer == b'NO "Authentication failed"\r\n'
        assert b"AUTHENTICATE" not in peer.received
        proxy.wait_for_log("status=failed: Server does not offer SASL PLAIN")


def test_login_timeout_says_bye(perdition_factory, dovecot):
    """--login_timeout bounds the time before login; ManageSieve's
    farewell is BYE with the reason as a string."""
    proxy = perdition_factory(["--login_timeout", "1"], "MANAGESIEVE",
                              dovecot.sieve_port)
    with RawClient(proxy.port) as client:
        greeting(client)
        assert wait_for_eof(client) == b'BYE "Login timeout"\r\n'
    proxy.wait_for_log("127.0.0.1: Login timeout")


def test_tls_listen_force_offers_no_sasl_before_tls(perdition_factory,
                                                    dovecot):
    """SASL is listed empty, as RFC 5804 section 1.7 has it while STARTTLS
    is offered, and filled in inside TLS."""
    proxy = perdition_factory(tls_args(dovecot, "tls_listen_force"),
                              "MANAGESIEVE", dovecot.sieve_port)
    with RawClient(proxy.port) as client:
        lines = greeting(client)
        assert b'"STARTTLS"\r\n' in lines
        assert [line for line in lines if line.startswith(b'"SASL"')] == \
            [b'"SASL" ""\r\n']
        client.send(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64("\0user45\0pw45"))
        assert client.readline().startswith(b'NO "Login disabled')
        client.send(b"STARTTLS\r\n")
        assert client.readline().startswith(b"OK ")
        context = ssl.create_default_context(cafile=dovecot.cert_file)
        client.starttls(context)
        lines = greeting(client)      # the capabilities again, inside TLS
        assert b'"SASL" "PLAIN"\r\n' in lines
        assert b'"STARTTLS"\r\n' not in lines
        client.send(b'AUTHENTICATE "PLAIN" "%s"\r\n' % b64("\0user45\0pw45"))
        assert client.readline() == b'OK "You are so in"\r\n'
    assert 'user="user45"' in proxy.log()


def test_perdition_pointed_at_itself(tmp_path):
    proxy = Perdition([], "MANAGESIEVE", tmp_path)
    proxy.args += ["-s", f"127.0.0.1:{proxy.port}", "-M", ""]
    with proxy:
        with RawClient(proxy.port) as client:
            greeting(client)
            client.send(b'AUTHENTICATE "PLAIN" "%s"\r\n'
                        % b64("\0user46\0pw46"))
            assert client.readline() == b'NO "Re-Authentication Failure"\r\n'


@pytest.mark.parametrize("argv0", ["perdition.managesieve",
                                   "/usr/sbin/perdition.managesieve"])
def test_program_name_and_ports(argv0, tmp_path, monkeypatch):
    monkeypatch.setattr(perdition, "SYSCONFDIR", str(tmp_path))
    config = perdition.Config([argv0])
    assert config.protocol == "MANAGESIEVE"
    assert (config.listen_port, config.outgoing_port) == (4190, 4190)
    config = perdition.Config(["perdition", "-P", "managesieve",
                               "--managesieve_capability", '"VERSION" "1.0"'])
    assert config.capability == '"VERSION" "1.0"'
