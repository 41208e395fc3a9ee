"""Unit tests of perdition_maps: every map library and its parser."""

import http.server
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MAIN = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(MAIN))

import perdition_maps  # noqa: E402
from perdition_maps import (  # noqa: E402
    GdbmMap, HttpMap, LookupContext, Map, MapError, MapRefused,
    PosixRegexMap, SqliteMap, ere_to_python, makedb, open_map)


def context(**changes):
    fields = dict(user="alice", password="secret", protocol="imap",
                  client_ip="192.0.2.7", client_port=40000,
                  server_ip="127.0.0.1", server_port=143)
    fields.update(changes)
    return LookupContext(**fields)


# ---------------------------------------------------------------------------
# gdbm
# ---------------------------------------------------------------------------

POPMAP = """\
# users and their servers
alice: mail1.example.net
  bob : mail2.example.net:1110

carol:remote@mail3.example.net:143
   # an indented comment
"""


@pytest.fixture
def popmap_db(tmp_path):
    source = tmp_path / "popmap"
    source.write_text(POPMAP)
    database = str(tmp_path / "popmap.db")
    makedb(str(source), database)
    return source, database


def test_makedb_and_lookup(popmap_db):
    _, database = popmap_db
    popmap = open_map("gdbm", database)
    assert isinstance(popmap, GdbmMap)
    assert popmap.lookup("alice", context()) == "mail1.example.net"
    assert popmap.lookup("bob", context()) == "mail2.example.net:1110"
    assert popmap.lookup("carol", context()) == "remote@mail3.example.net:143"
    assert popmap.lookup("dave", context()) is None
    assert popmap.lookup("# users and their servers", context()) is None


def test_makedb_leaves_no_temporary_files(popmap_db):
    source, database = popmap_db
    makedb(str(source), database)
    names = os.listdir(os.path.dirname(database))
    assert not [name for name in names if name.startswith(".makedb-")]
    assert all(name == "popmap" or name.startswith("popmap.db")
               for name in names)


def test_rebuilt_db_takes_effect_without_reopening(popmap_db):
    source, database = popmap_db
    popmap = open_map("gdbm", database)
    assert popmap.lookup("alice", context()) == "mail1.example.net"
    source.write_text("alice: elsewhere.example.net:995\nerin: mail9\n")
    makedb(str(source), database)
    assert popmap.lookup("alice", context()) == "elsewhere.example.net:995"
    assert popmap.lookup("erin", context()) == "mail9"
    assert popmap.lookup("bob", context()) is None


def test_lookups_during_rebuilds_see_old_or_new_database(popmap_db):
    source, database = popmap_db
    # Values of very different lengths make a mixed index and data visible.
    versions = ["host%d%s:%d" % (i, "x" * (i * 37 % 500), i)
                for i in range(200)]
    source.write_text("".join("user%d: %s\n" % (n, versions[0])
                              for n in range(50)))
    makedb(str(source), database)
    popmap = GdbmMap(database)
    answers, errors = [], []
    done = threading.Event()

    def reader():
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            try:
                answers.append(popmap.lookup("user25", context()))
            except MapError as e:
                errors.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    for version in versions[1:]:
        source.write_text("".join("user%d: %s\n" % (n, version)
                                  for n in range(50)))
        makedb(str(source), database)
    done.set()
    thread.join()
    assert errors == []
    assert len(answers) > 10
    assert set(answers) <= set(versions)


@pytest.mark.parametrize("text, line, reason", [
    ("alice: mail1\nno colon here\n", 2, "expected <key>:<value>"),
    ("alice: mail1\n\n: mail2\n", 3, "expected <key>:<value>"),
    ("alice:\n", 1, "expected <key>:<value>"),
    ("alice: mail1\nbob: x\nalice: mail2\n", 3,
     "duplicate key 'alice' (first on line 1)"),
])
def test_makedb_rejects_bad_lines_and_keeps_old_db(popmap_db, text, line,
                                                   reason):
    source, database = popmap_db
    source.write_text(text)
    with pytest.raises(MapError) as info:
        makedb(str(source), database)
    assert str(info.value) == "%s:%d: %s" % (source, line, reason)
    assert GdbmMap(database).lookup("alice", context()) == "mail1.example.net"


def test_makedb_command(tmp_path):
    source = tmp_path / "popmap"
    source.write_text("alice: mail1:110\n")
    database = tmp_path / "popmap.db"
    command = [sys.executable, str(MAIN / "perdition_maps.py"), "makedb",
               str(source), str(database)]
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert GdbmMap(str(database)).lookup("alice", context()) == "mail1:110"
    source.write_text("alice mail1\n")
    result = subprocess.run(command, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "%s:1: expected <key>:<value>" % source in result.stderr
    command[-2] = "-"
    result = subprocess.run(command, input="alice: mail2\n",
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert GdbmMap(str(database)).lookup("alice", context()) == "mail2"


def test_missing_database_is_a_map_error(tmp_path):
    popmap = open_map("gdbm", str(tmp_path / "nothing.db"))
    with pytest.raises(MapError, match="nothing.db"):
        popmap.lookup("alice", context())


def test_unreadable_database_is_a_map_error(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"\x00not a database\xff" * 100)
    start = time.monotonic()
    with pytest.raises(MapError, match="garbage.db: cannot read database"):
        GdbmMap(str(path)).lookup("alice", context())
    assert time.monotonic() - start < 2


def test_gdbm_default_database():
    assert GdbmMap("").path == "/etc/perdition/popmap.db"


# ---------------------------------------------------------------------------
# posix_regex
# ---------------------------------------------------------------------------

def regex_map(tmp_path, text):
    path = tmp_path / "popmap.re"
    path.write_text(text)
    return PosixRegexMap(str(path))


def test_regex_first_match_wins_without_anchors(tmp_path):
    popmap = regex_map(tmp_path, "example: first\n^bob: second\n.*: last\n")
    assert popmap.lookup("bob@example.com", context()) == "first"
    assert popmap.lookup("bob", context()) == "second"
    assert popmap.lookup("carol", context()) == "last"


def test_regex_no_match_is_no_answer(tmp_path):
    popmap = regex_map(tmp_path, "^[a-k]: localhost")     # no final newline
    assert popmap.lookup("alice", context()) == "localhost"
    assert popmap.lookup("zed", context()) is None


def test_regex_group_substitution(tmp_path):
    popmap = regex_map(tmp_path,
                       "^(.*)@([^.]*)\\\\.(.*)$: $1_$2@imap.$3:143 \n"
                       "^(x)?y(.*)$ [$0|$1|$2]\n")
    assert popmap.lookup("joe@sales.example.com", context()) == \
        "joe_sales@imap.example.com:143"
    assert popmap.lookup("yz", context()) == "[yz||z]"


def test_regex_escapes_quotes_comments_and_continuation(tmp_path):
    popmap = regex_map(tmp_path, r"""# comment line
'^(.*)@example\.com$' 'mail1'   # literal dot, quoted
^a\ b\#c: "hash # and space"
"^lit:"  : colon
^con\
tinued$ \
   joined
^x[[:digit:]]+$ digits
""")
    assert popmap.lookup("u@example.com", context()) == "mail1"
    assert popmap.lookup("u@exampleXcom", context()) is None
    assert popmap.lookup("a b#c", context()) == "hash # and space"
    assert popmap.lookup("lit:", context()) == "colon"
    assert popmap.lookup("continued", context()) == "joined"
    assert popmap.lookup("x123", context()) == "digits"
    assert popmap.lookup("xa1", context()) is None


def test_regex_docstring_example(tmp_path):
    doc = perdition_maps.__doc__
    example = doc[doc.index("For example:"):doc.index("The first line")]
    popmap = regex_map(tmp_path, example.split(":", 1)[1])
    assert popmap.lookup("joe@example.com", context()) == \
        "joe@imap.example.com:143"
    assert popmap.lookup("joe@exampleXcom", context()) == "mail1.example.net"
    assert popmap.lookup("zed", context()) == "mail2.example.net"


def test_regex_single_quotes_nest_in_double_quotes(tmp_path):
    """As in the configuration file: inside "...", '...' quotes again, so
    a '"' there is literal."""
    popmap = regex_map(tmp_path, "\"^a'b\"c'd$\" host\n")
    assert popmap.lookup('ab"cd', context()) == "host"


def test_regex_double_quotes_keep_backslashes(tmp_path):
    popmap = regex_map(tmp_path, r'"^a\.b$" "it\s" ' "\n")
    assert popmap.lookup("a.b", context()) == r"it\s"
    assert popmap.lookup("aXb", context()) is None


@pytest.mark.parametrize("text, line, reason", [
    ("ok: a\n\n(unclosed: b\n", 3, "bad regex '(unclosed'"),
    ("ok: a\n[[:nonsense:]] b\n", 2, "unknown character class"),
    ("^(a)(b): $3\n", 1, "$3 but the regex has 2 groups"),
    ("(?i)abc: b\n", 1, "'?' may not follow '('"),
    ("ok: a\njust-a-regex\n", 2, "expected <regex>[:] <substitution>"),
    ("# c\nok: 'unterminated\n", 2, "unterminated ' quote"),
    ("one\\\ntwo: x\n*bad: y\n", 3, "bad regex '*bad'"),
])
def test_regex_bad_line_names_file_and_line(tmp_path, text, line, reason):
    path = tmp_path / "popmap.re"
    path.write_text(text)
    with pytest.raises(MapError) as info:
        PosixRegexMap(str(path))
    assert str(info.value).startswith("%s:%d: " % (path, line))
    assert reason in str(info.value)


def test_regex_missing_file(tmp_path):
    with pytest.raises(MapError, match="popmap.re"):
        open_map("posix_regex", str(tmp_path / "popmap.re"))


def test_regex_bad_file_names_its_line(tmp_path):
    """What makes a reload (SIGHUP) fail and keep the old map."""
    (tmp_path / "popmap.re").write_text("^a: new\n[z b\n")
    with pytest.raises(MapError, match=r"popmap\.re:2: "):
        open_map("posix_regex", str(tmp_path / "popmap.re"))


@pytest.mark.parametrize("posix, matches, misses", [
    (r"[]a]", ["]", "a"], ["b"]),
    (r"[^]a]", ["b"], ["]", "a"]),
    (r"^[a-]$", ["-", "a"], ["b"]),
    (r"^[\.]$", ["\\", "."], ["a"]),
    (r"^[[:upper:][:digit:]]+$", ["AB12"], ["ab"]),
    (r"^[[.-.]x]$", ["-", "x"], ["a"]),
    (r"\<cat\>", ["a cat!"], ["concat", "cats"]),
    (r"^a|b&c~$", ["ab", "b&c~"], ["b&c"]),
    (r"^(ab){2}$", ["abab"], ["ab"]),
])
def test_ere_translation(posix, matches, misses):
    import re
    regex = re.compile(ere_to_python(posix))
    assert [s for s in matches if not regex.search(s)] == []
    assert [s for s in misses if regex.search(s)] == []


def test_ere_translation_rejects():
    for bad in ("[abc", "x\\", "[[=ab=]]", "[z-a]"):
        with pytest.raises(ValueError):
            ere_to_python(bad)


# ---------------------------------------------------------------------------
# sqlite
# ---------------------------------------------------------------------------

@pytest.fixture
def sqlite_db(tmp_path):
    path = tmp_path / "popmap.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE tblPerdition (user TEXT PRIMARY KEY, "
                   "servername TEXT, port INTEGER)")
        db.executemany("INSERT INTO tblPerdition VALUES (?, ?, ?)", [
            ("alice", " mail1.example.net ", 1110),
            ("bob", "mail2.example.net", None),
            ("carol", None, 143)])
    db.close()
    return path


def test_sqlite_lookup(sqlite_db):
    popmap = open_map("sqlite", str(sqlite_db))
    assert isinstance(popmap, SqliteMap)
    assert popmap.lookup("alice", context()) == "mail1.example.net:1110"
    assert popmap.lookup("bob", context()) == "mail2.example.net"
    assert popmap.lookup("carol", context()) is None
    assert popmap.lookup("dave", context()) is None
    assert popmap.lookup("x' OR '1'='1", context()) is None


def test_sqlite_edit_takes_effect_at_once(sqlite_db):
    popmap = SqliteMap(str(sqlite_db))
    assert popmap.lookup("bob", context()) == "mail2.example.net"
    with sqlite3.connect(sqlite_db) as db:
        db.execute("UPDATE tblPerdition SET port = 995 WHERE user = 'bob'")
        db.execute("INSERT INTO tblPerdition VALUES ('dave', 'mail4', NULL)")
    db.close()
    assert popmap.lookup("bob", context()) == "mail2.example.net:995"
    assert popmap.lookup("dave", context()) == "mail4"


def test_sqlite_custom_table_and_columns(tmp_path):
    path = tmp_path / "users.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE routes (login, host, tcp_port)")
        db.execute("INSERT INTO routes VALUES ('eve', 'mail5', '2143')")
    db.close()
    popmap = SqliteMap("%s:routes:login:host:tcp_port" % path)
    assert popmap.lookup("eve", context()) == "mail5:2143"


def test_sqlite_defaults_fill_empty_fields():
    popmap = SqliteMap("::login")
    assert popmap.path == "/etc/perdition/popmap.sqlite"
    assert popmap.query == ("SELECT [servername], [port] FROM "
                            "[tblPerdition] WHERE [login] = ? LIMIT 1")


@pytest.mark.parametrize("option", [
    "db:popmap; DROP TABLE popmap",
    "db:popmap:user:server name",
    "db:popmap:user:servername:\"port\"",
    "db:popmap:1user",
    "db:popmap:user:servername:port:extra",
])
def test_sqlite_rejects_bad_option(option):
    with pytest.raises(MapError, match="sqlite map option"):
        SqliteMap(option)


def test_sqlite_missing_database_is_not_created(tmp_path):
    path = tmp_path / "missing.sqlite"
    popmap = SqliteMap(str(path))
    with pytest.raises(MapError, match="missing.sqlite"):
        popmap.lookup("alice", context())
    assert not path.exists()


def test_sqlite_misspelt_column_is_an_error(sqlite_db):
    with pytest.raises(MapError, match="no such column: login"):
        SqliteMap("%s:tblPerdition:login" % sqlite_db).lookup("alice",
                                                            context())


def test_sqlite_missing_table(tmp_path):
    path = tmp_path / "empty.sqlite"
    sqlite3.connect(path).close()
    with pytest.raises(MapError, match="no such table"):
        SqliteMap(str(path)).lookup("alice", context())


# ---------------------------------------------------------------------------
# http
# ---------------------------------------------------------------------------

class AuthHandler(http.server.BaseHTTPRequestHandler):
    """A scriptable auth_http service: see the auth_server fixture."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers))
        if server.mode == "hang":
            server.release.wait(10)
            return
        if server.mode == "drip":
            # Each read beats the timeout; only the deadline can end it.
            try:
                self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                for _ in range(30):
                    self.wfile.write(b"X-Pad: 1\r\n")
                    self.wfile.flush()
                    if server.release.wait(0.2):
                        return
            except OSError:
                pass
            return
        self.send_response(server.status)
        for name, value in server.reply:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(b"ignored body\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AuthHandler)
    server.daemon_threads = True
    server.requests = []
    server.mode = "reply"
    server.status = 200
    server.reply = [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.2"),
                    ("Auth-Port", "1143")]
    server.release = threading.Event()
    server.url = "http://127.0.0.1:%d" % server.server_address[1]
    thread = threading.Thread(target=server.serve_forever,
                              kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    thread.join()
    server.server_close()


def test_http_ok_and_request_headers(auth_server):
    popmap = open_map("http", auth_server.url + "/auth?site=1")
    assert isinstance(popmap, HttpMap)
    answer = popmap.lookup("ignored-key", context(
        user="joe user@example.com", password="p%ss wörd", protocol="pop3",
        attempt=3))
    assert answer == "127.0.0.2:1143"
    [(path, headers)] = auth_server.requests
    assert path == "/auth?site=1"
    assert headers["Auth-Method"] == "plain"
    assert headers["Auth-User"] == "joe%20user@example.com"
    assert headers["Auth-Pass"].encode("latin-1").decode() == "p%25ss%20wörd"
    assert headers["Auth-Protocol"] == "pop3"
    assert headers["Auth-Login-Attempt"] == "3"
    assert headers["Client-IP"] == "192.0.2.7"
    assert headers["Host"] == "127.0.0.1:%d" % auth_server.server_address[1]


def test_http_user_and_password_from_service(auth_server):
    auth_server.reply += [("Auth-User", "joe@internal"),
                          ("Auth-Pass", "master-secret")]
    lookup_context = context(domain_delimiter="%")
    answer = HttpMap(auth_server.url).lookup("alice", lookup_context)
    assert answer == "joe@internal%127.0.0.2:1143"
    assert lookup_context.password == "master-secret"
    assert auth_server.requests[0][0] == "/"


def test_http_shared_secret_header(auth_server):
    HttpMap(auth_server.url + "/a,header=X-Auth-Key: s3cret,timeout=2"
            ).lookup("alice", context())
    assert auth_server.requests[0][1]["X-Auth-Key"] == "s3cret"


def test_http_crlf_in_credentials_cannot_inject_headers(auth_server):
    user = "bob\r\nAuth-Status: OK\r\nX-Injected: 1"
    HttpMap(auth_server.url).lookup("bob", context(user=user,
                                                   password="a\nb\x00c"))
    [(_, headers)] = auth_server.requests
    assert headers.get_all("Auth-User") == [
        "bob%0D%0AAuth-Status:%20OK%0D%0AX-Injected:%201"]
    assert headers["Auth-Pass"] == "a%0Ab%00c"
    assert "X-Injected" not in headers and "Auth-Status" not in headers


def test_http_refusal(auth_server):
    auth_server.reply = [("Auth-Status", "Invalid login or password")]
    with pytest.raises(MapRefused) as info:
        HttpMap(auth_server.url).lookup("alice", context())
    assert str(info.value) == "Invalid login or password"


def test_http_auth_wait_is_honoured_and_capped(auth_server, monkeypatch):
    auth_server.reply = [("Auth-Status", "Try later"), ("Auth-Wait", "30")]
    monkeypatch.setattr(HttpMap, "max_auth_wait", 0.5)
    start = time.monotonic()
    with pytest.raises(MapRefused, match="^Try later$"):
        HttpMap(auth_server.url).lookup("alice", context())
    assert 0.5 <= time.monotonic() - start < 5


@pytest.mark.parametrize("status, reply", [
    (404, []),
    (200, [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.2")]),
    (200, [("Auth-Status", "OK"), ("Auth-Port", "143")]),
    (200, [("Auth-Status", "")]),
])
def test_http_malformed_reply_is_unavailable(auth_server, status, reply):
    auth_server.status, auth_server.reply = status, reply
    with pytest.raises(MapRefused,
                       match="^Authentication service unavailable$"):
        HttpMap(auth_server.url).lookup("alice", context())
    assert len(auth_server.requests) == 1


@pytest.mark.parametrize("mode", ["hang", "drip"])
def test_http_slow_service_times_out(auth_server, mode):
    auth_server.mode = mode
    popmap = HttpMap(auth_server.url + ",timeout=1")
    start = time.monotonic()
    with pytest.raises(MapRefused,
                       match="^Authentication service unavailable$"):
        popmap.lookup("alice", context())
    assert time.monotonic() - start < 2.5
    assert len(auth_server.requests) == 1


def test_http_connection_refused():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(MapRefused,
                       match="^Authentication service unavailable$") as info:
        HttpMap("http://127.0.0.1:%d/auth" % port).lookup("alice", context())
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("option", [
    "", "ftp://127.0.0.1/", "http:///auth", "http://127.0.0.1:99999/",
    "http://127.0.0.1/a b", "http://127.0.0.1/,timeout=soon",
    "http://127.0.0.1/,timeout=0", "http://127.0.0.1/,colour=blue",
    "http://127.0.0.1/,header=Bad Name:x",
])
def test_http_rejects_bad_option(option):
    with pytest.raises(MapError, match="http map option"):
        HttpMap(option)


# ---------------------------------------------------------------------------
# open_map
# ---------------------------------------------------------------------------

def test_open_map_empty_is_no_map():
    assert open_map("", "anything") is None


@pytest.mark.parametrize("library, cls", [
    ("gdbm", GdbmMap),
    ("/usr/lib/libperditiondb_gdbm.so.0", GdbmMap),
    ("/usr/lib/libperditiondb_gdbm.so.0.0.0", GdbmMap),
    ("libperditiondb_sqlite.so", SqliteMap),
    ("sqlite", SqliteMap),
])
def test_open_map_builtin_names(library, cls):
    popmap = open_map(library, "some-option")
    assert type(popmap) is cls
    assert popmap.option == "some-option"


def test_open_map_library_path_selects_posix_regex(tmp_path):
    path = tmp_path / "popmap.re"
    path.write_text("^a: b\n")
    popmap = open_map("/usr/local/lib/libperditiondb_posix_regex.so.0",
                      str(path))
    assert type(popmap) is PosixRegexMap
    assert popmap.lookup("alice", context()) == "b"


@pytest.mark.parametrize("library, named", [
    ("/usr/lib/libperditiondb_mysql.so.0", "'mysql'"),
    ("nonsense", "'nonsense'"),
    ("/usr/lib/libperditiondb_gdbm.so.x", "libperditiondb_gdbm.so.x"),
])
def test_open_map_unknown_library(library, named):
    with pytest.raises(MapError, match="unknown map library") as info:
        open_map(library, "")
    assert named in str(info.value)


def test_open_map_site_class(tmp_path):
    path = tmp_path / "sitemap.py"
    path.write_text('''\
from dataclasses import dataclass
from perdition_maps import Map as BaseMap

@dataclass
class Rule:
    suffix: str
    server: str

class Map(BaseMap):
    def __init__(self, option):
        super().__init__(option)
        self.rule = Rule(*option.split("="))

    def lookup(self, key, context):
        if key.endswith(self.rule.suffix):
            return " %s:%d " % (self.rule.server, context.server_port)
        return None
''')
    popmap = open_map(str(path), "@example.org=imap.example.org")
    assert isinstance(popmap, Map)
    assert popmap.lookup("joe@example.org", context()) == \
        " imap.example.org:143 "
    assert popmap.lookup("joe@example.com", context()) is None
    popmap.close()


def test_open_map_site_factory(tmp_path):
    path = tmp_path / "factory.py"
    path.write_text('''\
import perdition_maps

class Fixed(perdition_maps.Map):
    def lookup(self, key, context):
        return self.option

def open_map(option):
    return Fixed("fixed:" + option)
''')
    assert open_map(str(path), "host").lookup("x", context()) == "fixed:host"


@pytest.mark.parametrize("source, reason", [
    ("x = 1\ndef broken(:\n", r"factory\.py:2: invalid syntax"),
    ("x = 1\n\nraise RuntimeError('no config')\n",
     r"factory\.py:3: RuntimeError: no config"),
    ("def lookup(key, context):\n    return None\n",
     "defines neither open_map"),
    ("from perdition_maps import Map\n", "defines neither open_map"),
    ("class Map:\n    def __init__(self, option): pass\n",
     "is not a perdition_maps.Map"),
    ("from perdition_maps import MapError\n"
     "def open_map(option):\n    raise MapError('cannot reach LDAP')\n",
     "^cannot reach LDAP$"),
])
def test_open_map_bad_site_file(tmp_path, source, reason):
    path = tmp_path / "factory.py"
    path.write_text(source)
    with pytest.raises(MapError, match=reason):
        open_map(str(path), "")
    assert not [name for name in sys.modules
                if name.startswith("perdition_map_factory")]


def test_open_map_missing_site_file(tmp_path):
    with pytest.raises(MapError, match="nowhere.py: No such file"):
        open_map(str(tmp_path / "nowhere.py"), "")


def test_base_map_defaults():
    popmap = Map("opt")
    assert popmap.option == "opt"
    assert popmap.close() is None
    with pytest.raises(NotImplementedError):
        popmap.lookup("key", context())
    assert set(perdition_maps.BUILTIN_MAPS) == {"gdbm", "posix_regex",
                                                "sqlite", "http"}


def test_regex_comment_continued_by_a_backslash(tmp_path):
    """As in the configuration file, a comment ending in a backslash goes on
    to the next line, which is then no rule of its own; the line numbers
    of later errors stay right."""
    popmap = regex_map(tmp_path, "# a comment \\\n^hidden$ nowhere\n"
                                 "^shown$ here\n")
    assert popmap.lookup("hidden", context()) is None
    assert popmap.lookup("shown", context()) == "here"
    with pytest.raises(perdition_maps.MapError, match=r":4: "):
        regex_map(tmp_path, "# c \\\nstill comment\nok: a\n(bad: b\n")
    assert regex_map(tmp_path, "^x$ y\n# last \\").lookup(
        "x", context()) == "y"
