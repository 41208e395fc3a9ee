"""The real server sees the real client (issue 11, part 2): with
--forward_client_address perdition tells Dovecot the client's address by
IMAP ID, POP3 XCLIENT and ManageSieve XCLIENT, which Dovecot takes from its
login_trusted_networks and logs as rip=; a hop count stops two proxies
that send a login round in a circle.  Scripted real servers show what
exactly perdition says, and that a server which offers neither ID nor
XCLIENT hears nothing of it.
"""

import base64
import re

import pytest

from dovecot import Dovecot
from helpers import Perdition, RawClient, TIMEOUT, wait_until
from support import ScriptedBackend, log_in_and_out, wait_for_eof

CLIENT = "127.0.0.5"
PROTOCOLS = ["IMAP4", "POP3", "MANAGESIEVE"]
# perdition's session id: nine random bytes in base64
SESSION_RE = r"[A-Za-z0-9+/]{12}"


@pytest.fixture(scope="module")
def trusting(tmp_path_factory):
    """A Dovecot that takes the client's address from proxies on
    127.0.0.0/8."""
    with Dovecot(tmp_path_factory.mktemp("trusting"),
                 extra="login_trusted_networks = 127.0.0.0/8\n") as server:
        yield server


def dovecot_port(dovecot, protocol):
    return {"IMAP4": dovecot.imap_port, "POP3": dovecot.pop3_port,
            "MANAGESIEVE": dovecot.sieve_port}[protocol]


def greet(client, protocol):
    """perdition's greeting: one line, for ManageSieve the capability
    lines up to the OK line."""
    lines = [client.readline()]
    while protocol == "MANAGESIEVE" and lines[-1].startswith(b'"'):
        lines.append(client.readline())
    return lines


def authenticate_line(user=b"alice", password=b"alicepw"):
    """ManageSieve's login: AUTHENTICATE "PLAIN" with the initial
    response."""
    return b'AUTHENTICATE "PLAIN" "%s"\r\n' % base64.b64encode(
        b"\0%s\0%s" % (user, password))


def log_in_on(client, protocol):
    """On a greeted RawClient, log in as alice and out again; return the
    answer to the login."""
    if protocol != "MANAGESIEVE":
        return log_in_and_out(client, protocol)
    client.send(authenticate_line())
    answer = client.readline()
    client.send(b"LOGOUT\r\n")
    wait_for_eof(client)
    return answer


def log_in(port, protocol, source=None):
    """Log in as alice; return perdition's answer to the login."""
    with RawClient(port, source=source) as client:
        greet(client, protocol)
        return log_in_on(client, protocol)


def dovecot_login_line(dovecot, protocol, count):
    """Dovecot's count-th "Login:" line of alice for the protocol."""
    service = {"IMAP4": "imap-login", "POP3": "pop3-login",
               "MANAGESIEVE": "managesieve-login"}[protocol]
    lines = []

    def logged():
        lines[:] = [line for line in dovecot.log().splitlines()
                    if service + ": Info: Login: user=<alice>" in line]
        return len(lines) >= count
    wait_until(logged, timeout=TIMEOUT, what="Dovecot's login line")
    return lines[count - 1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dovecot_logs_the_real_client(trusting, perdition_factory, protocol):
    port = dovecot_port(trusting, protocol)
    count = 0
    for forward, rip in ((True, CLIENT), (False, "127.0.0.1")):
        proxy = perdition_factory(["--forward_client_address"] if forward
                                  else [], protocol, port)
        assert b"OK" in log_in(proxy.port, protocol, (CLIENT, 0))
        count += 1
        line = dovecot_login_line(trusting, protocol, count)
        assert "rip=%s," % rip in line, line
        assert "lip=127.0.0.1," in line


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_proxy_loop_is_stopped_by_the_hop_count(tmp_path, protocol):
    """perdition A sends every login to B and B to A.  The greetings
    differ (-B), so the greeting check cannot tell; the hop count can."""
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
    ("MANAGESIEVE", b"XCLIENT ADDR=192.0.2.1 TTL=1\r\n"),
])
def test_a_hop_count_from_a_proxy_in_front_is_honoured(
        dovecot, perdition_factory, protocol, command):
    proxy = perdition_factory(["--forward_client_address"], protocol,
                              dovecot_port(dovecot, protocol))
    with RawClient(proxy.port) as client:
        greet(client, protocol)
        client.send(command)
        if protocol == "MANAGESIEVE":
            assert client.readline() == b'OK "Updated"\r\n'
            client.send(authenticate_line())
            assert client.readline() == b'NO "Too many proxy hops"\r\n'
        elif protocol == "IMAP4":
            client.read_until(b"OK")
            client.read_until(b"\n")
            client.send(b"b LOGIN alice alicepw\r\n")
            assert client.readline() == b"b NO Too many proxy hops\r\n"
        else:
            client.read_until(b"OK")
            client.read_until(b"\n")
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


@pytest.mark.parametrize("forward", [True, False])
def test_managesieve_xclient_exists_only_with_forwarding(
        dovecot, perdition_factory, forward):
    """With the option perdition lists "XCLIENT", as Dovecot does to the
    proxies it trusts, so that a perdition in front passes the hop count
    on; without it XCLIENT is an unknown command."""
    proxy = perdition_factory(["--forward_client_address"] if forward
                              else [], "MANAGESIEVE", dovecot.sieve_port)
    with RawClient(proxy.port) as client:
        assert (b'"XCLIENT"\r\n' in greet(client, "MANAGESIEVE")) == forward
        client.send(b"CAPABILITY\r\n")
        assert (b'"XCLIENT"\r\n' in greet(client, "MANAGESIEVE")) == forward
        client.send(b"XCLIENT ADDR=192.0.2.1 PORT=1 SESSION=s TTL=2\r\n")
        answer = client.readline()
        if forward:
            assert answer == b'OK "Updated"\r\n'
        else:
            assert answer.startswith(b'NO "Unknown command, expected ')
            assert b"XCLIENT" not in answer
        # TTL=2 leaves one hop to pass on: the login goes through.
        assert log_in_on(client, "MANAGESIEVE") == \
            b'OK "You are so in"\r\n'


# ---------------------------------------------------------------------------
# What a scripted real server hears
# ---------------------------------------------------------------------------

def recording_server(protocol, offer, lines):
    """A real server of *protocol* that keeps every line it receives in
    *lines* and says yes to everything.  *offer* is where it offers ID or
    XCLIENT: "greeting" (the IMAP greeting's capabilities, POP3's
    [XCLIENT] greeting, ManageSieve's capability greeting), "capa" (POP3's
    CAPA), or None."""
    def script(peer):
        if protocol == "IMAP4":
            peer.send(b"* OK [CAPABILITY IMAP4rev1%s] scripted\r\n"
                      % (b" ID" if offer else b""))
        elif protocol == "POP3":
            peer.send(b"+OK [XCLIENT] scripted\r\n" if offer == "greeting"
                      else b"+OK scripted\r\n")
        else:
            peer.send(b'"IMPLEMENTATION" "scripted"\r\n"SASL" "PLAIN"\r\n'
                      b'%s"VERSION" "1.0"\r\nOK "scripted ready"\r\n'
                      % (b'"XCLIENT"\r\n' if offer else b""))
        while True:
            line = peer.readline().rstrip(b"\r\n")
            lines.append(line)
            verb = line.split(b" ")[1 if protocol == "IMAP4" else 0].upper()
            if protocol == "IMAP4":
                tag = line.split(b" ")[0]
                if verb == b"ID":
                    peer.send(b'* ID ("name" "scripted")\r\n')
                peer.send(b"%s OK done\r\n" % tag)
            elif protocol == "POP3":
                if verb == b"CAPA":
                    peer.send(b"+OK\r\nUSER\r\n%s.\r\n" % (
                        b"XCLIENT\r\n" if offer == "capa" else b""))
                else:
                    peer.send(b"+OK\r\n")
            else:
                peer.send(b'OK "done"\r\n')
            if verb in (b"LOGOUT", b"QUIT"):
                return
    return script


LOGIN_LINES = {
    "IMAP4": [b'P%d LOGIN "alice" "alicepw"', b"b LOGOUT"],
    "POP3": [b"USER alice", b"PASS alicepw", b"QUIT"],
    "MANAGESIEVE": [authenticate_line().rstrip(b"\r\n"), b"LOGOUT"],
}


def forwarded_login(perdition_factory, protocol, offer):
    """Log in through a forwarding perdition from CLIENT to a recording
    server; return (the lines it heard, the client's port, perdition's
    port)."""
    lines = []
    with ScriptedBackend(recording_server(protocol, offer, lines)) \
            as backend:
        proxy = perdition_factory(["--forward_client_address"], protocol,
                                  backend.port)
        with RawClient(proxy.port, source=(CLIENT, 0)) as client:
            port = client.sock.getsockname()[1]
            greet(client, protocol)
            assert b"OK" in log_in_on(client, protocol)
        backend.join(1)
    return lines, port, proxy.port


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_without_id_or_xclient_hears_only_the_login(
        perdition_factory, protocol):
    """Forwarding adds nothing towards a server that offers neither ID
    nor XCLIENT: only the login (and for POP3 the CAPA that asks whether
    XCLIENT is offered)."""
    lines, _, _ = forwarded_login(perdition_factory, protocol, None)
    expected = list(LOGIN_LINES[protocol])
    if protocol == "IMAP4":
        expected[0] = expected[0] % 1
    elif protocol == "POP3":
        expected.insert(0, b"CAPA")
    assert lines == expected


@pytest.mark.parametrize("protocol, offer", [
    ("IMAP4", "greeting"), ("POP3", "greeting"), ("POP3", "capa"),
    ("MANAGESIEVE", "greeting")])
def test_a_server_with_id_or_xclient_hears_the_client(
        perdition_factory, protocol, offer):
    """Exactly Dovecot's fields: the client's address and port, the
    address and port it connected to, a session id, and four hops left
    (five at the first hop, less this one); then the login as without."""
    lines, port, listen = forwarded_login(perdition_factory, protocol, offer)
    expected = list(LOGIN_LINES[protocol])
    if protocol == "IMAP4":
        match = re.fullmatch(rb'P1 ID \(.*"x-session-id" "(%s)".*\)'
                             % SESSION_RE.encode(), lines[0])
        assert match, lines
        fields = ("x-originating-ip", CLIENT, "x-originating-port", port,
                  "x-connected-ip", "127.0.0.1", "x-connected-port", listen,
                  "x-session-id", match.group(1).decode(), "x-proxy-ttl", 4)
        forward = [b"P1 ID (%s)" % " ".join(
            '"%s"' % value for value in fields).encode()]
        expected[0] = expected[0] % 2
    else:
        at = 1 if offer == "capa" else 0
        match = re.fullmatch(rb"XCLIENT .* SESSION=(%s) .*"
                             % SESSION_RE.encode(), lines[at])
        assert match, lines
        forward = [b"XCLIENT ADDR=%s PORT=%d SESSION=%s TTL=4"
                   % (CLIENT.encode(), port, match.group(1))]
        if offer == "capa":
            forward.insert(0, b"CAPA")
    assert lines == forward + expected
