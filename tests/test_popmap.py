r"""The popmap end to end (issue 3): every map library, the choice of the
real server and the rewriting of user names, seen by a real client through
perdition and two real Dovecots.

Two Dovecot instances, A and B, hold the same users, and every user's INBOX
holds one message whose subject names the instance and the mailbox:
"B:carol@example.com", say.  A client logs in through perdition and reads
that subject, which tells both where perdition sent it and which name it
logged in with there; the instances look names up exactly
(auth_username_format=%u), so a wrong name is a failed login.  Unless a
test says otherwise, -s is A and the map sends the keys it knows to B, so
landing on B proves that the map answered for the key the test expected.

The parsers of the map libraries have unit tests in test_maps.py; here each
map is used the way an administrator would use it.  Every deliberate
failure below is perdition's own: a failed Dovecot login costs half a
second, so no test asks for one.
"""

import contextlib
import http.server
import imaplib
import os
import poplib
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from dovecot import Dovecot, free_port
from helpers import PERDITION, TIMEOUT, pop3_connect, run_perdition

MAKEDB = [sys.executable,
          os.path.join(os.path.dirname(PERDITION), "perdition_maps.py"),
          "makedb"]

# Both instances hold all of these; the pairs that differ only in a domain
# or in case let a test tell which name perdition logged in with.
USERS = {
    "alice": "alicepw",
    "bob": "bobpw",
    "carol": "carolpw",
    "carol@example.com": "carolpw",
    "erin": "erinpw",
    "erin@example.com": "erinpw",
    "dave@localhost": "davepw",
    "Mixed": "mixedpw",
}


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """Dovecot instances A and B, as a tuple."""
    with contextlib.ExitStack() as stack:
        servers = []
        for name in "AB":
            server = Dovecot(tmp_path_factory.mktemp("dovecot" + name), USERS)
            for user in USERS:
                server.add_message(user, b"From: postmaster@localhost\r\n"
                                   b"Subject: %s:%s\r\n\r\nHello.\r\n"
                                   % (name.encode(), user.encode()))
            servers.append(stack.enter_context(server))
        yield tuple(servers)


@pytest.fixture
def mapdir(tmp_path):
    """A directory for map files that perdition can still read after it has
    dropped its privileges to nobody."""
    Dovecot._make_traversable(str(tmp_path))
    return tmp_path


def write(path, text):
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def imap_at(server):
    return "127.0.0.1:%d" % server.imap_port


def pop3_at(server):
    return "127.0.0.1:%d" % server.pop3_port


class Client(imaplib.IMAP4):
    """imaplib's client to perdition, optionally from a chosen source
    address (for the \\i and \\p escapes of --query_key)."""

    def __init__(self, port, source=None):
        self.source = source
        super().__init__("127.0.0.1", port, timeout=TIMEOUT)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=self.source)

    def login_lands(self, user, password):
        """Log in; return the INBOX's subject, e.g. "A:alice"."""
        self.login(user, password)
        typ, data = self.select("INBOX", readonly=True)
        assert typ == "OK", data
        typ, data = self.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK", data
        return subject(data[0][1].splitlines())

    def refused(self, user, password):
        """Log in expecting NO; return its text.  The session stays open
        for another attempt."""
        with pytest.raises(imaplib.IMAP4.error) as failure:
            self.login(user, password)
        assert self.state == "NONAUTH"
        return str(failure.value)


def subject(lines):
    for line in lines:
        if line.lower().startswith(b"subject:"):
            return line.partition(b":")[2].strip().decode()
    raise AssertionError("no Subject in %r" % lines)


def lands(perdition, user, password, source=None):
    """Where a whole IMAP session as user ends up: "<instance>:<mailbox>"."""
    imap = Client(perdition.port, source)
    try:
        return imap.login_lands(user, password)
    finally:
        imap.logout()


def pop3_lands(perdition, user, password):
    """lands() by POP3."""
    pop = pop3_connect(perdition.port)
    try:
        pop.user(user)
        pop.pass_(password)
        return subject(pop.top(1, 0)[1])
    finally:
        pop.quit()


def auth_ports(perdition):
    """The back-end ports of the successful logins so far, from the log."""
    return [int(line.partition(' port="')[2].partition('"')[0])
            for line in perdition.log().splitlines()
            if "Auth: " in line and line.endswith("status=ok")]


# ---------------------------------------------------------------------------
# The map libraries
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("library", [
    "gdbm", "/usr/lib/libperditiondb_gdbm.so.0"])
def test_gdbm_popmap_and_rebuild_without_restart(
        backends, mapdir, perdition_factory, library):
    a, b = backends
    popmap = mapdir / "popmap"
    write(popmap, "# routed to B\nalice: %s\n" % imap_at(b))
    subprocess.run(MAKEDB + ["popmap", "popmap.db"], cwd=mapdir, check=True,
                   timeout=30)
    perdition = perdition_factory(["-M", library,
                                   "-m", mapdir / "popmap.db",
                                   "-s", imap_at(a)])
    assert lands(perdition, "alice", "alicepw") == "B:alice"
    assert lands(perdition, "bob", "bobpw") == "A:bob"

    write(popmap, "bob: %s\n" % imap_at(b))
    subprocess.run(MAKEDB + ["popmap", "popmap.db"], cwd=mapdir, check=True,
                   timeout=30)
    assert lands(perdition, "alice", "alicepw") == "A:alice"
    assert lands(perdition, "bob", "bobpw") == "B:bob"


def sighup(perdition, expected):
    """Send SIGHUP; wait until the log has one more line with expected."""
    before = perdition.log().count(expected)
    os.kill(perdition.pid, signal.SIGHUP)
    deadline = time.monotonic() + 5
    while perdition.log().count(expected) == before:
        assert time.monotonic() < deadline, \
            "no %r after SIGHUP:\n%s" % (expected, perdition.log())
        time.sleep(0.02)


def test_posix_regex_substitution_and_sighup_reload(
        backends, mapdir, perdition_factory):
    a, b = backends
    popmap = write(mapdir / "popmap.re",
                   "# user@example.com logs in as user, on B\n"
                   "'^(.*)@example\\.com$':  $1@%s\n" % imap_at(b))
    perdition = perdition_factory(["-M", "posix_regex", "-m", popmap, "-U",
                                   "-s", imap_at(a)])
    assert lands(perdition, "carol@example.com", "carolpw") == "B:carol"
    assert lands(perdition, "erin@example.com", "erinpw") == "B:erin"
    assert lands(perdition, "carol", "carolpw") == "A:carol"

    write(mapdir / "popmap.re", "'^(.*)@example\\.com$'  $1@%s\n"
          "^carol$ %s\n" % (imap_at(a), imap_at(b)))
    sighup(perdition, "Reloaded: generation 2")
    assert lands(perdition, "carol@example.com", "carolpw") == "A:carol"
    assert lands(perdition, "carol", "carolpw") == "B:carol"

    # A bad file is reported with its line and the old table stays.
    write(mapdir / "popmap.re", "^carol$ %s\n'^(unclosed' %s\n"
          % (imap_at(a), imap_at(b)))
    sighup(perdition, "Reload failed, keeping generation 2: option -M, "
           "--map_library posix_regex: %s:2:" % popmap)
    assert lands(perdition, "carol", "carolpw") == "B:carol"


def test_sqlite_map_with_own_table_and_columns(
        backends, mapdir, perdition_factory):
    a, b = backends
    database = mapdir / "popmap.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("CREATE TABLE mailhosts (login TEXT PRIMARY KEY, "
                   "host TEXT, imapport INTEGER)")
        db.execute("INSERT INTO mailhosts VALUES ('alice', '127.0.0.1', ?)",
                   (b.imap_port,))
        # No port: -p, the default real-server port, applies.
        db.execute("INSERT INTO mailhosts VALUES ('bob', '127.0.0.1', NULL)")
    database.chmod(0o644)
    perdition = perdition_factory([
        "-M", "sqlite", "-m", "%s:mailhosts:login:host:imapport" % database,
        "-s", imap_at(a), "-p", b.imap_port])
    assert lands(perdition, "alice", "alicepw") == "B:alice"
    assert lands(perdition, "bob", "bobpw") == "B:bob"
    assert lands(perdition, "carol", "carolpw") == "A:carol"

    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("UPDATE mailhosts SET imapport = ? WHERE login = 'alice'",
                   (a.imap_port,))
        db.execute("DELETE FROM mailhosts WHERE login = 'bob'")
        db.execute("INSERT INTO mailhosts VALUES ('carol', '127.0.0.1', ?)",
                   (b.imap_port,))
    assert lands(perdition, "alice", "alicepw") == "A:alice"
    assert lands(perdition, "bob", "bobpw") == "A:bob"
    assert lands(perdition, "carol", "carolpw") == "B:carol"


def test_sqlite_map_takes_a_mysql_popmap_table_as_it_is(
        backends, mapdir, perdition_factory):
    """perditiondb(5)'s SQL maps: table tblPerdition, columns user,
    servername and port; -m names only the database."""
    a, b = backends
    database = mapdir / "popmap.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        # The MySQL popmap's own definition, as perdition's docs give it.
        db.execute("CREATE TABLE tblPerdition (user VARCHAR(128) NOT NULL, "
                   "servername VARCHAR(255) NOT NULL, port VARCHAR(8), "
                   "PRIMARY KEY (user))")
        db.execute("INSERT INTO tblPerdition VALUES ('alice', '127.0.0.1', "
                   "?)", (str(b.imap_port),))
    database.chmod(0o644)
    perdition = perdition_factory(["-M", "sqlite", "-m", database,
                                   "-s", imap_at(a)])
    assert lands(perdition, "alice", "alicepw") == "B:alice"
    assert lands(perdition, "bob", "bobpw") == "A:bob"


@pytest.mark.parametrize("option, message", [
    ("{db}", "no such table: tblPerdition"),
    ("{db}:tblPerdition:login", "no such column: login"),
])
def test_sqlite_lookup_error_is_logged_with_the_databases_message(
        backends, mapdir, perdition_factory, option, message):
    """A broken map is no answer (the -s server serves), and the log says
    what the database said."""
    a, _ = backends
    database = mapdir / "popmap.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("CREATE TABLE %s (user, servername, port)"
                   % ("tblPerdition" if ":" in option else "other"))
    database.chmod(0o644)
    perdition = perdition_factory(["-M", "sqlite", "-m",
                                   option.format(db=database),
                                   "-s", imap_at(a)])
    assert lands(perdition, "alice", "alicepw") == "A:alice"
    log = perdition.wait_for_log("Map lookup of alice failed: ")
    assert "%s: %s" % (database, message) in log


class AuthService(http.server.ThreadingHTTPServer):
    """An nginx mail auth_http service: answers(headers) gives the reply
    headers for a request; every request's headers are kept."""

    daemon_threads = True

    def __init__(self, answers):
        self.answers = answers
        self.requests = []
        super().__init__(("127.0.0.1", 0), AuthHandler)

    @property
    def url(self):
        return "http://127.0.0.1:%d/auth" % self.server_address[1]


class AuthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.headers)
        reply = self.server.answers(self.headers)
        self.send_response(200)
        for name, value in reply.items():
            self.send_header(name, str(value))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_service():
    """start(answers) -> a running AuthService, shut down after the test."""
    services = []

    def start(answers):
        service = AuthService(answers)
        threading.Thread(target=service.serve_forever, daemon=True).start()
        services.append(service)
        return service

    yield start
    for service in services:
        service.shutdown()
        service.server_close()


def test_http_map_routes_refuses_and_honours_auth_user_and_pass(
        backends, perdition_factory, auth_service):
    a, b = backends
    stalled = threading.Event()

    def answers(headers):
        user = headers["Auth-User"]
        if user == "slow":
            stalled.wait(5)
        if user == "alice":
            return {"Auth-Status": "OK", "Auth-Server": "127.0.0.1",
                    "Auth-Port": b.imap_port}
        if user == "token":     # a one-time token stands for bob
            return {"Auth-Status": "OK", "Auth-Server": "127.0.0.1",
                    "Auth-Port": b.imap_port, "Auth-User": "bob",
                    "Auth-Pass": "bobpw"}
        return {"Auth-Status": "Invalid login or password", "Auth-Wait": 0}

    service = auth_service(answers)
    perdition = perdition_factory(["-M", "http", "-m",
                                   service.url + ",timeout=1", "-U",
                                   "-s", imap_at(a)])
    try:
        imap = Client(perdition.port)
        try:
            assert "Invalid login or password" in imap.refused("mallory",
                                                               "guess")
            started = time.monotonic()
            assert "Authentication service unavailable" in \
                imap.refused("slow", "pw")
            assert time.monotonic() - started < 3
            assert imap.login_lands("alice", "alicepw") == "B:alice"
        finally:
            imap.logout()
    finally:
        stalled.set()
    assert lands(perdition, "token", "opaque") == "B:bob"
    alice = [h for h in service.requests if h["Auth-User"] == "alice"]
    assert alice and alice[0]["Auth-Pass"] == "alicepw" \
        and alice[0]["Auth-Protocol"] == "imap" \
        and alice[0]["Client-IP"] == "127.0.0.1"
    log = perdition.log()
    assert "Map refused mallory: Invalid login or password" in log
    assert 'user="mallory"' in log and \
        "status=failed: Invalid login or password" in log


def test_http_service_down_is_a_clean_pop3_failure(backends,
                                                   perdition_factory):
    a, _ = backends
    perdition = perdition_factory(
        ["-M", "http", "-m", "http://127.0.0.1:%d/auth,timeout=2"
         % free_port(), "-s", pop3_at(a)], protocol="POP3")
    pop = pop3_connect(perdition.port)
    try:
        started = time.monotonic()
        for _ in range(2):      # and again: the session goes on
            pop.user("alice")
            with pytest.raises(poplib.error_proto,
                               match="Authentication service unavailable"):
                pop.pass_("alicepw")
        assert time.monotonic() - started < 3
    finally:
        pop.quit()
    perdition.wait_for_log("Map refused alice: Authentication service "
                           "unavailable")


SITE_MAP = '''\
"""A site's map: alice goes where -m says; looking bob up fails."""

from perdition_maps import Map as BaseMap


class Map(BaseMap):
    def lookup(self, key, context):
        if key == "bob":
            raise RuntimeError("the directory is on fire")
        return self.option if key == "alice" else None
'''


def test_site_map_and_a_failing_lookup_falls_back_to_round_robin(
        backends, mapdir, perdition_factory):
    a, b = backends
    site_map = write(mapdir / "sitemap.py", SITE_MAP)
    perdition = perdition_factory(["-M", site_map, "-m", imap_at(b),
                                   "-s", "%s,%s" % (imap_at(a), imap_at(b))])
    assert lands(perdition, "alice", "alicepw") == "B:alice"
    assert [lands(perdition, "bob", "bobpw") for _ in range(3)] == \
        ["A:bob", "B:bob", "A:bob"]
    assert lands(perdition, "alice", "alicepw") == "B:alice"
    assert perdition.log().count("Map lookup of bob failed: the directory "
                                 "is on fire") == 3


# ---------------------------------------------------------------------------
# Choosing the server
# ---------------------------------------------------------------------------

def test_no_answer_uses_outgoing_servers_in_round_robin(backends,
                                                        perdition_factory):
    a, b = backends
    perdition = perdition_factory(["-M", "", "-s", "%s,%s"
                                   % (imap_at(a), imap_at(b))])
    assert [lands(perdition, user, USERS[user])
            for user in ("alice", "bob", "alice", "carol")] == \
        ["A:alice", "B:bob", "A:alice", "B:carol"]
    perdition.wait_for_log('user="carol"')
    assert auth_ports(perdition) == [a.imap_port, b.imap_port] * 2


def test_no_answer_and_no_outgoing_server(backends, mapdir,
                                          perdition_factory):
    _, b = backends
    popmap = write(mapdir / "popmap.re", "^alice$ %s\n" % pop3_at(b))
    perdition = perdition_factory(["-M", "posix_regex", "-m", popmap],
                                  protocol="POP3")
    pop = pop3_connect(perdition.port)
    try:
        pop.user("bob")
        with pytest.raises(poplib.error_proto,
                           match="Could not determine server"):
            pop.pass_("bobpw")
        pop.user("alice")
        pop.pass_("alicepw")
        assert subject(pop.top(1, 0)[1]) == "B:alice"
    finally:
        pop.quit()
    assert 'user="bob" passwd="XXXXXX" server="" port="" ' \
        'status=failed: Could not determine server' in perdition.log()


@pytest.mark.parametrize("from_database, password, expected", [
    (False, "alicepw", "B:alice"),
    (True, "bobpw", "B:bob"),
])
def test_user_in_answer_is_used_only_with_username_from_database(
        backends, mapdir, perdition_factory, from_database, password,
        expected):
    a, b = backends
    popmap = write(mapdir / "popmap.re", "^alice$ bob@%s\n" % imap_at(b))
    perdition = perdition_factory(["-M", "posix_regex", "-m", popmap,
                                   "-s", imap_at(a)]
                                  + ["-U"] * from_database)
    assert lands(perdition, "alice", password) == expected


def test_no_lookup_refuses_host_names_from_the_map(backends, mapdir,
                                                  perdition_factory):
    a, b = backends
    popmap = write(mapdir / "popmap.re", "^alice$ localhost:%d\n^bob$ %s\n"
                   % (b.imap_port, imap_at(b)))
    args = ["-M", "posix_regex", "-m", popmap, "-s", imap_at(a)]
    resolving = perdition_factory(args)
    assert lands(resolving, "alice", "alicepw") == "B:alice"

    literal = perdition_factory(args + ["-n"])
    imap = Client(literal.port)
    try:
        assert "Could not determine server" in imap.refused("alice",
                                                            "alicepw")
        assert imap.login_lands("bob", "bobpw") == "B:bob"
    finally:
        imap.logout()
    assert "Server localhost from popmap is not an IP address and " \
        "no_lookup is set" in literal.log()


def test_bad_server_in_map_is_logged_and_a_clean_client_error(
        backends, mapdir, perdition_factory):
    a, b = backends
    bad = {"badhost": "bad_host!:143", "bigport": "127.0.0.1:70000",
           "portname": "127.0.0.1:no-such-service", "nohost": ":143",
           "smuggle": "'127.0.0.1:143 x'"}
    popmap = write(mapdir / "popmap.re", "".join(
        "^%s$ %s\n" % item for item in bad.items())
        + "^alice$ %s\n" % imap_at(b))
    perdition = perdition_factory(["-M", "posix_regex", "-m", popmap,
                                   "-s", imap_at(a)])
    imap = Client(perdition.port)
    try:
        for user in bad:
            assert "Could not determine server" in imap.refused(user, "pw")
        assert imap.login_lands("alice", "alicepw") == "B:alice"
    finally:
        imap.logout()
    log = perdition.log()
    for user, answer in bad.items():
        assert "Invalid server %s from popmap: " % answer.strip("'") in log
        assert 'user="%s" passwd="XXXXXX" server="" port="" ' \
            'status=failed: Invalid server from popmap' % user in log


def test_client_server_specification_imap(backends, mapdir,
                                          perdition_factory):
    a, b = backends
    popmap = write(mapdir / "popmap.re", "^alice$ %s\n" % imap_at(a))
    perdition = perdition_factory(["-c", "-M", "posix_regex", "-m", popmap,
                                   "-s", imap_at(a), "-p", b.imap_port])
    # The client's choice bypasses the map, which sends alice to A.
    assert lands(perdition, "alice@" + imap_at(b), "alicepw") == "B:alice"
    assert lands(perdition, "alice", "alicepw") == "A:alice"
    assert lands(perdition, "alice@127.0.0.1", "alicepw") == "B:alice"
    imap = Client(perdition.port)
    try:
        assert "Could not determine server" in imap.refused(
            "alice@bad_host!", "alicepw")
    finally:
        imap.logout()
    assert "Invalid server bad_host! from client" in perdition.log()


def test_client_server_specification_pop3_with_long_delimiter(
        backends, perdition_factory):
    a, b = backends
    perdition = perdition_factory(["-c", "-D", "%%", "-M", "",
                                   "-s", pop3_at(a)], protocol="POP3")
    assert pop3_lands(perdition, "alice%%" + pop3_at(b), "alicepw") == \
        "B:alice"
    assert pop3_lands(perdition, "alice", "alicepw") == "A:alice"


def test_long_delimiter_strips_and_splits_the_answer(backends, mapdir,
                                                     perdition_factory):
    a, b = backends
    popmap = write(mapdir / "popmap.re", "^carol$ erin%%%%%s\n"
                   % pop3_at(b))
    perdition = perdition_factory(["-D", "%%", "-S", "all", "-U",
                                   "-M", "posix_regex", "-m", popmap,
                                   "-s", pop3_at(a)], protocol="POP3")
    assert pop3_lands(perdition, "carol%%example.com", "erinpw") == "B:erin"


# ---------------------------------------------------------------------------
# User-name rewriting
# ---------------------------------------------------------------------------

# The keys the rewriting tests route to B; anything else goes to A.
ROUTED_TO_B = ["carol", "erin@example.com", "alice@localhost",
               "dave@localhost", "mixed"]


@pytest.mark.parametrize("options, user, expected", [
    # strip_domain
    (["-S", "remote_login"], "alice@example.com", "A:alice"),
    (["-S", "servername_lookup"], "carol@example.com",
     "B:carol@example.com"),
    (["-S", "all"], "carol@example.com", "B:carol"),
    # add_domain with an explicit domain, which is not stripped
    (["-A", "servername_lookup", "-e", "example.com"], "erin", "B:erin"),
    (["-A", "remote_login", "-e", "example.com"], "erin",
     "A:erin@example.com"),
    (["-A", "all,2", "-e", "example.com"], "erin", "B:erin@example.com"),
    # ... and none is added to a name that has one
    (["-A", "all", "-e", "example.org"], "erin@example.com",
     "B:erin@example.com"),
    # add_domain from 127.0.0.1's reverse lookup, "localhost": depth 0
    # keeps it, the default depth 1 leaves no domain to add
    (["-A", "servername_lookup,0"], "alice", "B:alice"),
    (["-A", "all,0"], "dave", "B:dave@localhost"),
    (["-A", "all"], "alice", "A:alice"),
    (["-A", "all,2"], "alice", "A:alice"),
    # lower_case
    (["--lower_case", "servername_lookup"], "Mixed", "B:Mixed"),
    (["--lower_case", "remote_login"], "ALICE", "A:alice"),
    (["--lower_case", "all"], "DAVE@LocalHost", "B:dave@localhost"),
    # all three, in the order strip, add, lower
    (["-S", "all", "-A", "all", "-e", "example.com", "--lower_case", "all"],
     "ERIN@elsewhere", "B:erin@example.com"),
])
def test_user_name_rewriting(backends, mapdir, perdition_factory, options,
                             user, expected):
    a, b = backends
    popmap = write(mapdir / "popmap.re", "".join(
        "'^%s$' %s\n" % (key, imap_at(b)) for key in ROUTED_TO_B))
    perdition = perdition_factory(options + ["-M", "posix_regex",
                                             "-m", popmap, "-s", imap_at(a)])
    mailbox = expected.partition(":")[2]
    assert lands(perdition, user, USERS[mailbox]) == expected


def test_local_authentication_is_a_state(backends, perdition_factory):
    a, _ = backends
    perdition = perdition_factory([
        "-S", "local_authentication", "-A", "local_authentication,2",
        "--lower_case", "local_authentication,servername_lookup",
        "-M", "", "-s", imap_at(a)])
    assert lands(perdition, "alice", "alicepw") == "A:alice"
    refused = run_perdition(["-S", "local_auth", "-M", "", "-s",
                             imap_at(a)])
    assert refused.returncode != 0
    assert "option -S" in refused.stderr and "'local_auth'" in \
        refused.stderr


SOURCE_IP = "127.0.0.3"


@pytest.mark.parametrize("query_key, key", [
    (r"\U", "alice@example.com"),
    (r"\u", "alice"),
    (r"<\D>", "<@>"),
    (r"\d", "example.com"),
    (r"\i", SOURCE_IP),
    (r"\I", "127.0.0.1"),
    (r"port=\p", "port={source_port}"),
    (r"\P", "{listen_port}"),
    (r"a\\b", "a\\b"),
    (r"\u\da_domain", "aliceexample.coma_domain"),
    # the first format that finds an answer wins
    (r"\u\Dnowhere,\d,\u", "example.com"),
])
def test_query_key(backends, mapdir, perdition_factory, query_key, key):
    """Each escape, by a key that only that escape expands to.  There is
    no -s, so a key the map does not know fails the login; -S makes the
    back-end name alice whatever the client's domain."""
    a, b = backends
    database = mapdir / "popmap.sqlite"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("CREATE TABLE tblPerdition (user TEXT PRIMARY KEY, "
                   "servername TEXT, port INTEGER)")
        # Found by the formats after the one expected to answer.
        db.execute("INSERT INTO tblPerdition VALUES ('alice', '127.0.0.1', "
                   "?)", (a.imap_port,))
    database.chmod(0o644)
    perdition = perdition_factory(["--query_key", query_key,
                                   "-S", "remote_login",
                                   "-M", "sqlite", "-m", database])
    source_port = free_port()
    key = key.format(source_port=source_port, listen_port=perdition.port)
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("INSERT OR REPLACE INTO tblPerdition VALUES (?, "
                   "'127.0.0.1', ?)", (key, b.imap_port))
    assert lands(perdition, "alice@example.com", "alicepw",
                 source=(SOURCE_IP, source_port)) == "B:alice"


def test_query_key_with_long_delimiter(backends, mapdir, perdition_factory):
    a, b = backends
    popmap = write(mapdir / "popmap.re", "'^\\(alice\\)%%%%$' %s\n"
                   % pop3_at(b))
    perdition = perdition_factory([
        "-D", "%%", "-S", "remote_login", "--query_key", r"(\u)\D",
        "-M", "posix_regex", "-m", popmap, "-s", pop3_at(a)],
        protocol="POP3")
    assert pop3_lands(perdition, "alice%%example.com", "alicepw") == \
        "B:alice"
