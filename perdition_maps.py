r"""perdition_maps -- the popmap libraries of perdition.

A map answers one question: which real server does this user go to?
perdition asks it with a lookup key (by default the user name, see
--query_key) and gets back ``[<user><delimiter>]<host>[:<port>]`` or no
answer, in which case the --outgoing_server list is used.

Choosing a map
--------------
-M/--map_library names the map, -m/--map_library_opt is handed to it:

    -M ""                           no map at all: every user goes to -s
    -M gdbm                         a compiled flat file (the default)
    -M posix_regex                  a file of regular expressions
    -M sqlite                       a table in an SQLite database
    -M http                         an nginx mail ``auth_http`` service
    -M /usr/lib/libperditiondb_gdbm.so.0
                                    the original's library names select the
                                    built-in of that name (gdbm, posix_regex,
                                    ...); ``.so`` and any ``.N`` suffixes may
                                    follow the name
    -M /etc/perdition/mymap.py      a site's own map, see below

The built-in maps
-----------------
gdbm (-m: database file, default /etc/perdition/popmap.db)
    A flat file of ``<key>:<value>`` lines (blank lines and lines whose
    first non-blank character is ``#`` are ignored; whitespace around key
    and value is dropped), compiled with

        python3 perdition_maps.py makedb popmap popmap.db

    into a database of whatever kind Python's dbm module offers.  The
    database is opened for each lookup, so a rebuilt one takes effect at
    once; makedb replaces it atomically.  A missing database is a MapError
    at lookup time; at start-up perdition only logs it (check()), and a
    reload fails on it.

posix_regex (-m: file, default /etc/perdition/popmap.re)
    Lines ``<extended regex>[:] <substitution>``, tried in order; the first
    regex found anywhere in the key (no implicit ^ or $) wins and its
    substitution is the answer, with ``$0``..``$9`` replaced by the match
    and its groups (a group that took no part is empty).  The file is
    tokenised like perdition's configuration file: ``#`` starts a comment
    (which a final backslash continues), a backslash before a newline joins
    lines, a backslash before any other character makes that character
    literal and is itself dropped (so a regex's ``\.`` is written ``\\.``, or
    quoted), everything inside '...' is literal, and inside "..." everything
    but the closing " is literal, except that '...' nests there.
    For example:

        '^(.*)@example\.com$'    $1@imap.example.com:143
        ^[a-k]:                 mail1.example.net    # the colon is optional
        .*                      mail2.example.net

    The first line sends joe@example.com to imap.example.com as "joe"
    (with -U).  POSIX classes such as ``[[:alpha:]]`` are understood;
    matching is Python's, leftmost-first rather than POSIX leftmost-longest
    where alternatives overlap.  Read when the map is opened: at start-up
    and on every reload (SIGHUP), where a bad file fails the reload.

sqlite (-m: ``dbpath:table:user_column:server_column:port_column``)
    Defaults /etc/perdition/popmap.sqlite, tblPerdition, user, servername,
    port -- the table and columns of perditiondb(5)'s SQL maps, so a table
    copied from a MySQL popmap works as it is; empty fields take the
    default.  The port may be NULL.  The database is
    opened read-only for each lookup, so edits take effect at once.

http (-m: ``URL[,timeout=SECS][,header=NAME:VALUE]...``)
    Speaks nginx's mail ``auth_http`` protocol: a GET to URL with the
    headers Auth-Method (plain), Auth-User, Auth-Pass (both %-escaped as
    nginx does), Auth-Protocol (pop3/imap), Auth-Login-Attempt, Client-IP,
    plus any ``header=`` given (a shared secret, for instance).  The reply
    ``Auth-Status: OK`` with Auth-Server and Auth-Port is the answer; an
    Auth-User in it becomes the user part of the answer and an Auth-Pass
    replaces ``context.password``.  Any other Auth-Status refuses the login
    (MapRefused, after any Auth-Wait, capped); an unreachable, slow (the
    whole exchange is bounded by the timeout, default 5 s) or malformed
    service refuses it too, as "Authentication service unavailable".
    Auth-User is the login name (``context.user``), not the lookup key.

Writing your own map
--------------------
Give -M the path of a Python file.  It is loaded as a module and must
define either a factory ``open_map(option)`` returning a Map, or a class
named ``Map``, called as ``Map(option)``; the factory wins if both exist.
The map must be an instance of ``perdition_maps.Map``:

    from perdition_maps import Map as BaseMap, MapError

    class Map(BaseMap):
        def lookup(self, key, context):
            if key.endswith("@example.org"):
                return "imap.example.org:143"
            return None                # no answer: use --outgoing_server

``Map.__init__`` stores the -m string as ``self.option``.  ``lookup`` may
be called from several threads at once.  Its errors mean:

    return None       no answer; perdition uses --outgoing_server
    raise MapError    the map is broken; logged, then treated as no answer
    raise MapRefused  the login is refused; str(exception) is the reason
                      given to the client and the log

perdition opens the map at start-up and again on every reload (SIGHUP),
so ``__init__`` reads whatever the map reads (a MapError there fails the
reload and the old map stays); ``close()`` is called once no session uses
a map any more, and does nothing unless overridden.  ``context`` is a LookupContext: the login name and
password, the protocol ("pop3" or "imap"), both ends of the client's
connection, the domain delimiter and the login attempt number.  Answers
are stripped of surrounding whitespace; perdition itself checks the host
and port in them.
"""

import argparse
import dbm
import dbm.dumb         # every backend is imported now: perdition drops
try:                    # privileges after start-up, and may then be unable
    import dbm.gnu      # to read the library
except ImportError:
    pass
try:
    import dbm.ndbm
except ImportError:
    pass
import encodings.latin_1  # noqa: F401  dbm.dumb's index is read as Latin-1
import http.client
import importlib.util
import os
import re
import shutil
import socket
import sqlite3
import string
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass

__all__ = ["MapError", "MapRefused", "Map", "LookupContext", "open_map",
           "GdbmMap", "PosixRegexMap", "SqliteMap", "HttpMap", "makedb"]


class MapError(Exception):
    """A map is broken (bad file, unreachable service): logged; treated as
    no answer."""


class MapRefused(Exception):
    """The map explicitly refuses this login (e.g. http Auth-Status not OK);
    its str is the reason for the client/log."""


@dataclass
class LookupContext:
    """What perdition knows about the login being looked up."""
    user: str
    password: str
    protocol: str           # "pop3" or "imap"
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    domain_delimiter: str = "@"
    attempt: int = 1


class Map:
    """Base class of every map; see the module docstring."""

    def __init__(self, option):
        self.option = option

    def lookup(self, key, context):
        """Return "[user<delim>]host[:port]" for key, or None."""
        raise NotImplementedError

    def check(self):
        """Raise MapError if the map cannot be read now: a map that reads
        its source at each lookup says so here, once, at start-up (logged)
        and at a reload (which then fails and keeps the old map)."""

    def close(self):
        """Release resources: a reload replaced the map, or perdition
        exits."""


# ---------------------------------------------------------------------------
# gdbm: a flat file compiled into a dbm database
# ---------------------------------------------------------------------------

# Names a dbm backend may give its files, beside the one it was given.
_DBM_SUFFIXES = ("", ".db", ".dat", ".dir", ".pag")
# What dbm.open and a read may raise: OSError is among dbm.error, and a
# corrupt dumb database can raise the other two.
_DBM_ERRORS = (*dbm.error, ValueError, SyntaxError)
_DBM_RETRIES = 20
_DBM_RETRY_DELAY = 0.01


def _read_popmap(source):
    """Parse a flat popmap file into {key: value} (bytes), in file order."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as e:
        raise MapError("%s: %s" % (source, e.strerror)) from None
    entries = {}
    first_seen = {}
    for number, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        key, colon, value = line.partition(b":")
        key, value = key.strip(), value.strip()
        if not colon or not key or not value:
            raise MapError("%s:%d: expected <key>:<value>" % (source, number))
        if key in entries:
            raise MapError("%s:%d: duplicate key %r (first on line %d)"
                           % (source, number, key.decode("utf-8", "replace"),
                              first_seen[key]))
        entries[key] = value
        first_seen[key] = number
    return entries


def makedb(source, database):
    """Compile the flat popmap file source ("-": stdin) into database.

    The database is built beside the target under a temporary name and
    renamed into place, so a lookup sees the old database or the new one,
    never a mixture.  A backend that keeps its index in a separate ".dir"
    file (dbm.dumb, ndbm) gets that index removed first and renamed in
    last: between the two a lookup finds no database and tries again.
    """
    entries = _read_popmap(source)
    directory, base = os.path.split(os.path.abspath(database))
    try:
        build_dir = tempfile.mkdtemp(prefix=".makedb-", dir=directory)
    except OSError as e:
        raise MapError("%s: %s" % (directory, e.strerror)) from None
    try:
        with dbm.open(os.path.join(build_dir, base), "n", 0o644) as db:
            for key, value in entries.items():
                db[key] = value
        suffixes = sorted((name[len(base):] for name in os.listdir(build_dir)),
                          key=lambda suffix: suffix == ".dir")
        if len(suffixes) > 1:
            try:
                os.unlink(database + ".dir")
            except FileNotFoundError:
                pass
        for suffix in suffixes:
            os.replace(os.path.join(build_dir, base + suffix),
                       database + suffix)
    except OSError as e:
        raise MapError("%s: %s" % (database, e)) from None
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


class GdbmMap(Map):
    """The default map: a popmap compiled by makedb, read on each lookup."""

    default_option = "/etc/perdition/popmap.db"

    def __init__(self, option):
        super().__init__(option)
        self.path = os.path.abspath(option or self.default_option)

    def check(self):
        try:
            with dbm.open(self.path, "r"):
                pass
        except _DBM_ERRORS as e:
            raise MapError("%s: cannot open database: %s"
                           % (self.path, e)) from None

    def _signature(self):
        """Identify the files now on disk, to notice a rebuild mid-read."""
        signature = []
        for suffix in _DBM_SUFFIXES:
            try:
                st = os.stat(self.path + suffix)
            except OSError:
                signature.append(None)
            else:
                signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return signature

    def lookup(self, key, context):
        # A lookup that overlapped a rebuild may have read an index of one
        # database and data of the other: it is done again.
        error = "changed while being read"
        for attempt in range(_DBM_RETRIES):
            if attempt:
                time.sleep(_DBM_RETRY_DELAY)
            before = self._signature()
            if not any(before):
                raise MapError("%s: no such database" % self.path)
            try:
                with dbm.open(self.path, "r") as db:
                    value = db.get(key.encode("utf-8", "surrogateescape"))
            except _DBM_ERRORS as e:
                error = e
                continue
            if self._signature() == before:
                if value is None:
                    return None
                return value.decode("utf-8", "replace").strip() or None
        raise MapError("%s: cannot read database: %s" % (self.path, error))


# ---------------------------------------------------------------------------
# posix_regex: a file of extended regular expressions
# ---------------------------------------------------------------------------

def _config_records(text, filename):
    """Split text like perdition's configuration file.

    Yield (line number, words) for each non-blank logical line.  A word is
    (text, bare_colon): bare_colon tells that it ends in a ':' that was
    neither quoted nor escaped, i.e. a field separator.
    """
    words = []
    word = None         # the word being built; None between words
    bare_colon = False
    quote = None
    number = start = 1
    text += "\n"       # so that every line, the last too, ends in a newline
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        i += 1
        if quote:           # '...' nests in "...", as in the config file
            if c == quote[-1]:
                quote = quote[:-1]
            elif c == "\n":
                raise MapError("%s:%d: unterminated %s quote"
                               % (filename, number, quote[-1]))
            elif c == "'" and quote == '"':
                quote += c
            else:
                word += c
            bare_colon = False
            continue
        if c == "\\":
            if text[i] == "\n":
                number += 1
            else:
                word = (word or "") + text[i]
                bare_colon = False
            i += 1
            continue
        if c == "#":        # to the end of the line; a final \ continues it
            while i < n and (text[i] != "\n" or text[i - 1] == "\\"):
                number += text[i] == "\n"
                i += 1
            continue
        if c in " \t\r\n":
            if word is not None:
                words.append((word, bare_colon))
                word = None
            if c == "\n":
                if words:
                    yield start, words
                words = []
                number += 1
                start = number
            continue
        if c in "'\"":
            quote = c
            word = word or ""
            continue
        word = (word or "") + c
        bare_colon = c == ":"
    # Only a backslash before the final newline leaves a line unfinished.
    if word is not None:
        words.append((word, bare_colon))
    if words:
        yield start, words


def _class_escape(c):
    """A literal character inside a Python [...] set."""
    return "\\" + c if c in "\\]^-[&~|" else c


_POSIX_CLASSES = {
    "alpha": "A-Za-z", "digit": "0-9", "alnum": "0-9A-Za-z",
    "upper": "A-Z", "lower": "a-z", "xdigit": "0-9A-Fa-f",
    "space": " \\t\\n\\r\\f\\v", "blank": " \\t",
    "punct": "".join("\\" + c for c in string.punctuation),
    "print": "\\x20-\\x7e", "graph": "\\x21-\\x7e",
    "cntrl": "\\x00-\\x1f\\x7f",
}

# GNU regex escapes outside brackets that are not simply a literal.
_ERE_ESCAPES = {
    "w": r"\w", "W": r"\W", "s": r"\s", "S": r"\S", "b": r"\b", "B": r"\B",
    "<": r"\b(?=\w)", ">": r"\b(?<=\w)", "`": r"\A", "'": r"\Z",
}


def _bracket_char(pattern, j):
    """One character of a bracket expression, [.c.] and [=c=] included."""
    for opener, closer in (("[.", ".]"), ("[=", "=]")):
        if pattern.startswith(opener, j):
            if pattern.find(closer, j + 2) != j + 3:
                raise ValueError("only one-character %s%s are supported"
                                 % (opener, closer))
            return pattern[j + 2], j + 5
    return pattern[j], j + 1


def _bracket(pattern, i):
    """Translate the bracket expression at pattern[i] == '['."""
    j = i + 1
    negate = pattern.startswith("^", j)
    j += negate
    items = []
    while True:
        if j >= len(pattern):
            raise ValueError("unmatched [")
        if pattern[j] == "]" and items:
            break
        if pattern.startswith("[:", j):
            end = pattern.find(":]", j + 2)
            name = pattern[j + 2:end]
            if end < 0 or name not in _POSIX_CLASSES:
                raise ValueError("unknown character class [:%s:]" % name)
            items.append(_POSIX_CLASSES[name])
            j = end + 2
            continue
        low, j = _bracket_char(pattern, j)
        if (pattern.startswith("-", j) and j + 1 < len(pattern)
                and pattern[j + 1] != "]"):
            high, j = _bracket_char(pattern, j + 1)
            if high < low:
                raise ValueError("invalid range %s-%s" % (low, high))
            items.append(_class_escape(low) + "-" + _class_escape(high))
        else:
            items.append(_class_escape(low))
    return "[" + "^" * negate + "".join(items) + "]", j + 1


def ere_to_python(pattern):
    """Translate a POSIX extended regular expression to Python's syntax.

    Raise ValueError for what POSIX would reject or Python would read
    differently ("(?" extensions, a trailing backslash).
    """
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "[":
            translated, i = _bracket(pattern, i)
            out.append(translated)
            continue
        if c == "\\":
            if i + 1 == n:
                raise ValueError("trailing backslash")
            d = pattern[i + 1]
            i += 2
            if d in _ERE_ESCAPES:
                out.append(_ERE_ESCAPES[d])
            elif d in "123456789":
                out.append("\\" + d)
            else:
                out.append(re.escape(d))
            continue
        if c == "(" and pattern.startswith("?", i + 1):
            raise ValueError("'?' may not follow '('")
        out.append(c)
        i += 1
    return "".join(out)


def _parse_substitution(text, groups):
    """Split a substitution into literal strings and group numbers."""
    parts = []
    for piece in re.split(r"(\$[0-9])", text):
        if re.fullmatch(r"\$[0-9]", piece):
            number = int(piece[1])
            if number > groups:
                raise ValueError("%s but the regex has %d group%s"
                                 % (piece, groups, "" if groups == 1 else "s"))
            parts.append(number)
        elif piece:
            parts.append(piece)
    return parts


def _read_regex_table(path):
    """Read and compile a popmap.re file into [(regex, parts)]."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise MapError("%s: %s" % (path, e.strerror)) from None
    table = []
    for number, words in _config_records(text, path):
        (regex, bare_colon), rest = words[0], words[1:]
        if bare_colon:
            regex = regex[:-1]
        if rest and rest[0] == (":", True):
            rest = rest[1:]
        if not rest:
            raise MapError("%s:%d: expected <regex>[:] <substitution>"
                           % (path, number))
        try:
            compiled = re.compile(ere_to_python(regex))
            parts = _parse_substitution(" ".join(w for w, _ in rest),
                                        compiled.groups)
        except (ValueError, re.error) as e:
            raise MapError("%s:%d: bad regex %r: %s"
                           % (path, number, regex, e)) from None
        table.append((compiled, parts))
    return table


class PosixRegexMap(Map):
    """A list of regular expressions and substitutions, first match wins."""

    default_option = "/etc/perdition/popmap.re"

    def __init__(self, option):
        super().__init__(option)
        self.path = os.path.abspath(option or self.default_option)
        self.table = _read_regex_table(self.path)

    def lookup(self, key, context):
        for regex, parts in self.table:
            match = regex.search(key)
            if match:
                answer = "".join(part if isinstance(part, str)
                                 else match.group(part) or ""
                                 for part in parts)
                return answer.strip() or None
        return None


# ---------------------------------------------------------------------------
# sqlite: a table user -> server, port
# ---------------------------------------------------------------------------

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SqliteMap(Map):
    """A table of user, servername and port, named as in the original SQL
    maps (perditiondb(5))."""

    defaults = ("/etc/perdition/popmap.sqlite", "tblPerdition",
                "user", "servername", "port")

    def __init__(self, option):
        super().__init__(option)
        fields = option.split(":") if option else []
        if len(fields) > len(self.defaults):
            raise MapError("sqlite map option %r: more than %d fields "
                           "(dbpath:table:user_column:server_column:"
                           "port_column)" % (option, len(self.defaults)))
        fields += [""] * (len(self.defaults) - len(fields))
        self.path, table, user, server, port = (
            field or default for field, default in zip(fields, self.defaults))
        for name in (table, user, server, port):
            if not _IDENTIFIER.match(name):
                raise MapError("sqlite map option %r: %r is not an "
                               "identifier" % (option, name))
        # [name], not "name": SQLite takes a "name" that matches no column
        # for a string, and a misspelt column would silently match nothing.
        self.query = ("SELECT [%s], [%s] FROM [%s] WHERE [%s] = ? LIMIT 1"
                      % (server, port, table, user))
        self.check_query = self.query.replace("LIMIT 1", "LIMIT 0")
        self.path = os.path.abspath(self.path)
        self.uri = "file:%s?mode=ro" % urllib.parse.quote(self.path)

    def check(self):
        """The database opens, and has the table and columns."""
        self._execute(self.check_query, "")

    def lookup(self, key, context):
        row = self._execute(self.query, key)
        if row is None or row[0] is None:
            return None
        server = str(row[0]).strip()
        port = "" if row[1] is None else str(row[1]).strip()
        if not server:
            return None
        return "%s:%s" % (server, port) if port else server

    def _execute(self, query, key):
        try:
            connection = sqlite3.connect(self.uri, uri=True)
            try:
                return connection.execute(query, (key,)).fetchone()
            finally:
                connection.close()
        except sqlite3.Error as e:
            raise MapError("%s: %s" % (self.path, e)) from None


# ---------------------------------------------------------------------------
# http: nginx's mail auth_http protocol
# ---------------------------------------------------------------------------

UNAVAILABLE = "Authentication service unavailable"
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escape_auth(text):
    """%-escape a value as nginx does for Auth-User and Auth-Pass.

    Space, '%' and control characters are escaped (so no CR or LF can reach
    the request); other bytes, UTF-8 included, pass as they are.
    """
    return re.sub(rb"[\x00-\x20%\x7f]",
                  lambda m: b"%%%02X" % m.group()[0],
                  text.encode("utf-8", "surrogateescape"))


def _abort(connection):
    """Watchdog: end a request that is past its deadline."""
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class HttpMap(Map):
    """Ask an nginx mail auth_http service where a user goes."""

    default_timeout = 5.0
    max_auth_wait = 10.0    # longest Auth-Wait honoured, in seconds

    def __init__(self, option):
        super().__init__(option)
        url, *settings = option.split(",")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise MapError("http map option %r: expected http://HOST[:PORT]"
                           "/PATH[,timeout=SECS][,header=NAME:VALUE]"
                           % option)
        try:
            self.port = parts.port or 80
        except ValueError as e:
            raise MapError("http map option %r: %s" % (option, e)) from None
        self.host = parts.hostname
        self.path = urllib.parse.urlunsplit(
            ("", "", parts.path or "/", parts.query, ""))
        if _CONTROL.search(url) or " " in url:
            raise MapError("http map option %r: bad URL" % option)
        self.timeout = self.default_timeout
        self.headers = []
        for setting in settings:
            name, _, value = setting.partition("=")
            name = name.strip()
            if name == "timeout":
                try:
                    self.timeout = float(value)
                except ValueError:
                    self.timeout = 0
                if not 0 < self.timeout < 3600:
                    raise MapError("http map option %r: bad timeout %r"
                                   % (option, value))
            elif name == "header":
                header, _, header_value = value.partition(":")
                if (not _HEADER_NAME.match(header)
                        or _CONTROL.search(header_value)):
                    raise MapError("http map option %r: bad header %r"
                                   % (option, value))
                self.headers.append((header, header_value.strip()))
            else:
                raise MapError("http map option %r: unknown setting %r"
                               % (option, name))

    def _request(self, context):
        """Send the request; return the response headers."""
        connection = http.client.HTTPConnection(self.host, self.port,
                                                timeout=self.timeout)
        # The socket timeout bounds each read; the watchdog bounds them all.
        watchdog = threading.Timer(self.timeout, _abort, (connection,))
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.putrequest("GET", self.path, skip_accept_encoding=True)
            for name, value in (
                    ("Auth-Method", b"plain"),
                    ("Auth-User", _escape_auth(context.user)),
                    ("Auth-Pass", _escape_auth(context.password)),
                    ("Auth-Protocol", context.protocol.lower()),
                    ("Auth-Login-Attempt", str(context.attempt)),
                    ("Client-IP", context.client_ip),
                    *self.headers):
                connection.putheader(name, value)
            connection.endheaders()
            return connection.getresponse().msg
        finally:
            watchdog.cancel()
            connection.close()

    def lookup(self, key, context):
        try:
            headers = self._request(context)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise MapRefused(UNAVAILABLE) from e

        def header(name):
            # http.client decodes header bytes as Latin-1; undo that.
            value = headers.get(name, "").encode("latin-1", "replace")
            return _CONTROL.sub("", value.decode("utf-8", "replace")).strip()

        status = header("Auth-Status")
        if not status:
            raise MapRefused(UNAVAILABLE) from MapError("no Auth-Status")
        if status != "OK":
            try:
                wait = int(header("Auth-Wait") or 0)
            except ValueError:
                wait = 0
            time.sleep(min(max(wait, 0), self.max_auth_wait))
            raise MapRefused(status)
        server, port = header("Auth-Server"), header("Auth-Port")
        if not server or not port:
            raise MapRefused(UNAVAILABLE) from MapError(
                "Auth-Status OK without Auth-Server and Auth-Port")
        if "Auth-Pass" in headers:
            context.password = header("Auth-Pass")
        user = header("Auth-User")
        answer = "%s:%s" % (server, port)
        return user + context.domain_delimiter + answer if user else answer


# ---------------------------------------------------------------------------
# Choosing a map
# ---------------------------------------------------------------------------

BUILTIN_MAPS = {
    "gdbm": GdbmMap,
    "posix_regex": PosixRegexMap,
    "sqlite": SqliteMap,
    "http": HttpMap,
}

_LIBRARY_NAME = re.compile(r"libperditiondb_(\w+)\.so(\.\d+)*\Z")


def _site_error(path, error):
    """Describe an exception raised by a site's map file, with its line."""
    if isinstance(error, SyntaxError):
        return "%s:%s: %s" % (path, error.lineno, error.msg)
    if isinstance(error, OSError) and error.filename == path:
        return "%s: %s" % (path, error.strerror)
    lines = [frame.lineno
             for frame in traceback.extract_tb(error.__traceback__)
             if frame.filename == path]
    where = "%s:%d" % (path, lines[-1]) if lines else path
    return "%s: %s: %s" % (where, type(error).__name__, error)


def _load_python_map(path, option):
    """Load a site's map from a Python file."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = "perdition_map_" + re.sub(r"\W", "_", stem)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module     # as import does; dataclasses need it
    try:
        spec.loader.exec_module(module)
        factory = getattr(module, "open_map", None) or getattr(module, "Map",
                                                               None)
        if not callable(factory) or factory is Map:
            raise MapError("%s: defines neither open_map(option) nor class "
                           "Map" % path)
        instance = factory(option)
        if not isinstance(instance, Map):
            raise MapError("%s: the map is not a perdition_maps.Map" % path)
    except Exception as e:
        del sys.modules[name]
        if isinstance(e, MapError):
            raise
        raise MapError(_site_error(path, e)) from None
    return instance


def open_map(library, option):
    """Open the map -M library names, with the -m option; None for "".

    Raise MapError if it cannot be opened, naming the file (and line) at
    fault.
    """
    if not library:
        return None
    if library.endswith(".py"):
        return _load_python_map(library, option)
    match = _LIBRARY_NAME.match(os.path.basename(library))
    name = match.group(1) if match else library
    if name not in BUILTIN_MAPS:
        raise MapError("unknown map library %r (%s); the built-in maps are %s"
                       % (name, library, ", ".join(BUILTIN_MAPS)))
    return BUILTIN_MAPS[name](option)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="perdition_maps.py", description="Tools for perdition's maps.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser(
        "makedb", help="compile a flat popmap file for the gdbm map",
        description="Compile SOURCE (lines <key>:<value>; - for stdin) into "
                    "the database DATABASE, replacing it atomically.")
    command.add_argument("source")
    command.add_argument("database")
    args = parser.parse_args(argv)
    try:
        makedb(args.source, args.database)
    except MapError as e:
        print("makedb: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
