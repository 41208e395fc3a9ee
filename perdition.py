#!/usr/bin/env python3
"""perdition -- a POP3, IMAP4 and ManageSieve proxy server.

A user connects to perdition and logs in with USER/PASS, LOGIN or SASL
PLAIN (AUTHENTICATE in IMAP and ManageSieve, AUTH in POP3).  perdition
looks the user up in its popmap, connects to that user's real server, logs in
there with the same credentials and from then on copies bytes both ways.

This module is the whole server; drop it onto a machine and run

    python3 perdition.py -P IMAP4S ...

or invoke it under one of the names perdition.pop3, perdition.pop3s,
perdition.imap4, perdition.imap4s, perdition.imaps or perdition.managesieve
(a symlink will do) to pick the protocol.  The manual page, man/perdition.8,
describes every option.

The sections follow the data: options and configuration; logging; user-name
handling; local authentication; back-end selection; TLS and connections; the
protocols; the session; the pump; the server and main().
"""

import _thread
import binascii
import collections
import _strptime        # noqa: F401  imported now: after setuid the
import encodings.idna   # noqa: F401  library may no longer be readable
import ctypes
import fcntl
import grp
import heapq
import ipaddress
import itertools
import os
import pwd
import re
import resource
import select
import signal
import socket
import socketserver
import ssl
import struct
import sys
import syslog
import tempfile
import threading
import time
import traceback

try:
    import perdition_maps
except ImportError:         # perdition.py alone works with -M ""
    perdition_maps = None

__version__ = "0.1"

SYSCONFDIR = os.environ.get("PERDITION_SYSCONFDIR", "/etc/perdition")
VAR_STATE_DIR = os.environ.get("PERDITION_VAR_STATE_DIR", "/var/run")

MAX_LINE = 8192                 # longest command line before login (RFC 2683)
MAX_LITERAL = 8192              # longest IMAP literal before login
MAX_SERVER_LINES = 1000         # most lines of one answer before login
BUFFER_SIZE = 65536             # pump read size
LINE_READ = 4096                # read size before login: commands are short
LINGER_TIME = 2.0               # seconds to read and drop input after an error
LINGER_BYTES = 16 << 20         # ... and at most this much of it
PROXY_TTL = 5                   # proxy hops a login may take, as Dovecot's
PROXY_HEADER_TIME = 3.0         # seconds a balancer has for its PROXY header
PROXY_HEADER_MAX = 536          # the TCP segment every host takes, which
                                # proxy-protocol.txt fits both versions in
THREAD_STACK_SIZE = 256 * 1024  # so that thousands of sessions fit
MAX_FAILURE_ADDRESSES = 65536   # client addresses --login_failure_limit
                                # follows at once: a flood cannot grow it
STOP_WAIT = 5.0                 # seconds for ended sessions to close
FAREWELL_TIME = 2.0             # an interrupted session's last words, at most
STATUS_INTERVAL = 5.0           # how often STATUS= follows the session count
RELOG_RECHECK = 60              # seconds between looks at --connect_relog 0


class OptionError(Exception):
    """A bad option or configuration line; the text names it."""


class LoginFailure(Exception):
    """A login attempt failed; the text is the reason for the log.

    The client is told `client_text` (or a generic failure) and may try again.
    """

    def __init__(self, reason, client_text=None):
        super().__init__(reason)
        self.client_text = client_text


class ServerUnreachable(LoginFailure):
    """The real server could not be reached: the connection, its TLS, its
    greeting or anything else before the credentials failed.  The next
    server, if there is one, is tried."""

    def __init__(self, reason, client_text=None):
        super().__init__(reason, client_text or "Could not connect to server")


class ProtocolError(Exception):
    """The peer broke the protocol so badly that the connection must end."""


# What a real server's connection can fail with during a login.
SERVER_ERRORS = (OSError, EOFError, ProtocolError, ssl.SSLError)


def server_error(error):
    """The log's reason for one of SERVER_ERRORS: its text, or its name
    where it has none (EOFError)."""
    return "Server error: %s" % (str(error) or type(error).__name__)


class ClientGone(Exception):
    """The client left while perdition waited for its real server: the
    login attempt is abandoned and nothing more is sent there."""


# ---------------------------------------------------------------------------
# Options and configuration
# ---------------------------------------------------------------------------

STATES = ("servername_lookup", "local_authentication", "remote_login")
LOG_PASSWD_STATES = ("never", "fail", "ok", "always")
SSL_MODES = {
    "none": set(),
    "ssl_listen": {"ssl_listen"},
    "ssl_outgoing": {"ssl_outgoing"},
    "ssl_all": {"ssl_listen", "ssl_outgoing"},
    "tls_listen": {"tls_listen"},
    "tls_outgoing": {"tls_outgoing"},
    "tls_all": {"tls_listen", "tls_outgoing"},
    "tls_listen_force": {"tls_listen", "tls_listen_force"},
    "tls_outgoing_force": {"tls_outgoing", "tls_outgoing_force"},
    "tls_all_force": {"tls_listen", "tls_listen_force",
                      "tls_outgoing", "tls_outgoing_force"},
}
SYSLOG_FACILITIES = ("auth", "authpriv", "cron", "daemon", "ftp", "kern",
                     "lpr", "mail", "news", "syslog", "user", "uucp",
                     "local0", "local1", "local2", "local3", "local4",
                     "local5", "local6", "local7")

HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
    r"(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?\Z")


def parse_wire_text(value):
    """Text that perdition sends to clients or servers as part of a line:
    a CR or LF in it would end the line early (and the rest would read as
    a second line), other control characters confuse clients.  A tab is
    plain text to every protocol here."""
    for c in value:
        if not c.isprintable() and c != "\t":
            raise OptionError("holds the unprintable character %r (a value "
                              "sent on the wire must be one line of text)"
                              % c)
    return value


def parse_flag(value):
    if value in (None, "", "1", "yes", "on", "true"):
        return True
    if value in ("0", "no", "off", "false"):
        return False
    raise OptionError("takes no value (or yes/no), not %r" % value)


def parse_count(value):
    if not (value.isascii() and value.isdigit()):
        raise OptionError("needs a whole number >= 0, not %r" % value)
    return int(value)


def parse_seconds(value):
    try:
        return parse_count(value)
    except OptionError:
        raise OptionError("needs a whole number of seconds >= 0, not %r"
                          % value) from None


def parse_port(value):
    """A port number or a service name from /etc/services."""
    if value.isdigit():
        port = int(value)
        if 0 < port < 65536:
            return port
        raise OptionError("port %s is out of range" % value)
    try:
        return socket.getservbyname(value, "tcp")
    except OSError:
        raise OptionError("unknown port name %r" % value) from None


def parse_host(host):
    """A host name or an IP address literal; nothing that could smuggle."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not HOSTNAME_RE.match(host):
        raise OptionError("invalid host name %r" % host)
    return host


def split_host_port(text):
    """Split host[:port], [v6]:port or a bare IPv6 address."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise OptionError("invalid address %r" % text)
        return host, rest[1:] or None
    if text.count(":") > 1:
        return text, None
    host, _, port = text.partition(":")
    return host, port or None


def parse_servers(value):
    """SERVER[,SERVER...] with SERVER host[:port] -> [(host, port|None)]."""
    servers = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        host, port = split_host_port(item)
        servers.append((parse_host(host),
                        parse_port(port) if port else None))
    return servers


def parse_states(value, depth=False):
    """STATE[,STATE...] (and with `depth` a trailing ,STRIP_DEPTH)."""
    states, strip_depth = set(), 1
    for word in filter(None, (v.strip() for v in value.split(","))):
        if depth and word.isdigit():
            strip_depth = int(word)
        elif word == "all":
            states.update(STATES)
        elif word in STATES:
            states.add(word)
        else:
            raise OptionError("unknown state %r (valid: %s, all)"
                              % (word, ", ".join(STATES)))
    return (frozenset(states), strip_depth) if depth else frozenset(states)


def parse_add_domain(value):
    return parse_states(value, depth=True)


def parse_choice(choices):
    def parse(value):
        if value.lower() not in choices:
            raise OptionError("must be one of %s, not %r"
                              % (", ".join(choices), value))
        return value.lower()
    return parse


def parse_protocol(value):
    """A -P value from the registry of protocols (see register())."""
    if value.upper() not in PROTOCOLS:
        raise OptionError("unknown protocol %r (available: %s)"
                          % (value, ", ".join(PROTOCOLS)))
    return value.upper()


def parse_ssl_mode(value):
    modes = set()
    for word in filter(None, (v.strip() for v in value.split(","))):
        if word not in SSL_MODES:
            raise OptionError("unknown ssl_mode %r (valid: %s)"
                              % (word, ", ".join(SSL_MODES)))
        modes |= SSL_MODES[word]
    if {"ssl_listen", "tls_listen"} <= modes or \
            {"ssl_outgoing", "tls_outgoing"} <= modes:
        raise OptionError("SSL and TLS cannot both be used on one side")
    return frozenset(modes)


def parse_log_facility(value):
    if not value.startswith("/") and value not in ("-", "+") \
            and value.lower() not in SYSLOG_FACILITIES:
        raise OptionError("unknown syslog facility %r" % value)
    return value


def parse_pid_file(value):
    if value and not value.startswith("/"):
        raise OptionError("must be a full path starting with '/'")
    return value


Rate = collections.namedtuple("Rate", "count seconds")


def parse_rate(value):
    """COUNT/SECONDS, or empty for none."""
    if not value:
        return None
    count, sep, seconds = value.partition("/")
    if not (sep and count.isascii() and count.isdigit() and int(count) > 0
            and seconds.isascii() and seconds.isdigit() and int(seconds) > 0):
        raise OptionError("needs COUNT/SECONDS, both whole numbers > 0, "
                          "not %r" % value)
    return Rate(int(count), int(seconds))


def parse_networks(value):
    """NETWORK[,NETWORK...], each an address or address/prefix."""
    networks = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise OptionError("invalid network %r" % item) from None
    return networks


def parse_query_key(value):
    """FORMAT[,FORMAT...]; each checked for unknown escapes now."""
    formats = [f for f in value.split(",") if f]
    for fmt in formats:
        for match in re.finditer(r"\\(.?)", fmt):
            if match.group(1) not in "UuDdiIpP\\" or not match.group(1):
                raise OptionError("unknown escape %r in query_key"
                                  % match.group(0))
    return formats


class Option:
    """One row of the option table: everything about one option.  A help
    text may be a function, for texts made from the registry of protocols
    (which is filled further down)."""

    def __init__(self, short, long, arg, default, help, parse=str,
                 aliases=()):
        self.short, self.long, self.arg = short, long, arg
        self.default, self._help, self.parse = default, help, parse
        self.aliases = aliases

    @property
    def help(self):
        return self._help() if callable(self._help) else self._help

    @property
    def names(self):
        return "%s--%s" % ("-%s, " % self.short if self.short else "",
                           ", --".join((self.long,) + self.aliases))


FLAG = parse_flag
# The option table: short name, long name, argument, default, help, parser.
# --help, the configuration file, the man page and the sample configuration
# are all made from it.  A default of None is derived from the protocol.
OPTIONS = [
    Option("A", "add_domain", "STATE[,STATE...][,STRIP_DEPTH]", "",
           "Append a domain to the user name in the given states: the "
           "reverse lookup of the address the client connected to, less "
           "STRIP_DEPTH leading labels (default 1), or --explicit_domain.",
           parse_add_domain),
    Option(None, "auth_failure_delay", "SECONDS", "2",
           "Delay the answer to a failed login by this long, against "
           "password guessing; 0 for none.", parse_seconds),
    Option(None, "authentication_timeout", "SECONDS", "1800",
           "Idle timeout while the user is unauthenticated; 0 for none.",
           parse_seconds, aliases=("authenticate_timeout",)),
    Option("a", "authenticate_in", None, "",
           "Authenticate the user locally through PAM (service perdition) "
           "before any real server is contacted.", FLAG),
    Option("B", "no_bind_banner", None, "",
           "Use the uname host name in the greeting, not the reverse lookup "
           "of --bind_address.", FLAG),
    Option("b", "bind_address", "SERVER[,SERVER...]", "",
           "Listen on these addresses, each host[:port] ([v6]:port); the "
           "port defaults to --listen_port.  Empty: all addresses.",
           parse_servers),
    Option("C", "connection_logging", None, "",
           "Log the authentication-phase dialogue (with -d only).", FLAG),
    Option(None, "connect_timeout", "SECONDS", "10",
           "How long a real server has, in all, to accept the connection "
           "and greet (TLS included); one that does not is unreachable.  "
           "0: --authentication_timeout.", parse_seconds),
    Option(None, "connect_relog", "SECONDS", "300",
           "How often to log the connection again, for POP/IMAP before "
           "SMTP; 0 for never.", parse_seconds),
    Option(None, "client_connection_limit", "N", "0",
           "Maximum simultaneous connections from one client address; 0 "
           "for no limit.", parse_count),
    Option("c", "client_server_specification", None, "",
           "Allow USER of the form user<delimiter>server[:port] to choose "
           "the server.", FLAG),
    Option("D", "domain_delimiter", "STRING", "@",
           "Delimiter between user name and domain.", parse_wire_text),
    Option("d", "debug", None, "", "Turn on verbose debugging.", FLAG),
    Option("e", "explicit_domain", "STRING", "",
           "With -A, use STRING as the domain instead of the reverse lookup "
           "of the address connected to.", parse_wire_text),
    Option("F", "log_facility", "FACILITY", "mail",
           "Syslog facility; a path starting with '/' is a file, '-' is "
           "stdout and '+' is stderr.", parse_log_facility),
    Option("f", "config_file", "FILENAME", "",
           "Configuration file; default <sysconfdir>/<basename>.conf, then "
           "perdition.<protocol>.conf, then perdition.conf."),
    Option("g", "group", "GROUP", "nobody", "Group to run as."),
    Option("h", "help", None, "", "Display this message.", FLAG),
    Option("I", "capability", "STRING", None,
           lambda: "Capabilities: %s.  perdition adds and removes these "
           "itself, as the connection's state says: %s." % (
               ", ".join('%s ones separated by %s (default \'%s\')'
                         % (cls.names[0].name, cls.separator_name,
                            cls.default_capability)
                         for cls in protocol_classes()),
               "; ".join("%s: %s" % (cls.names[0].name, ", ".join(
                   cls.managed_capabilities))
                   for cls in protocol_classes())),
           parse_wire_text,
           # register() adds each protocol's name for it: imap_capability
           ),
    Option("i", "inetd_mode", None, "", "Run in inetd mode.", FLAG),
    Option("L", "connection_limit", "LIMIT", "0",
           "Maximum simultaneous connections; 0 for no limit.", parse_count),
    Option("l", "listen_port", "PORT_NUMBER|PORT_NAME", None,
           lambda: "Port to listen on (default %s for %s)." % (
               or_list((str(e.port) for e in PROTOCOLS.values()), "and"),
               or_list(PROTOCOLS, "and")),
           parse_port),
    Option(None, "login_failure_limit", "COUNT/SECONDS", "",
           "After COUNT failed logins from one client address within "
           "SECONDS, its logins fail at once, with no map or real server "
           "asked, until the window passes.  Empty: no limit.", parse_rate),
    Option(None, "login_timeout", "SECONDS", "180",
           "Longest time from connecting to a successful login, however "
           "busy the client; 0 for none.", parse_seconds),
    Option(None, "login_disabled", None, "",
           "Do not allow users to log in; adds LOGINDISABLED in IMAP4.",
           FLAG),
    Option(None, "log_passwd", "STATE", "never",
           "Log the password: never, fail, ok or always; otherwise XXXXXX.",
           parse_choice(LOG_PASSWD_STATES)),
    Option(None, "lower_case", "STATE[,STATE...]", "",
           "Convert user names to lower case in the given states.",
           parse_states),
    Option(None, "max_errors", "N", "10",
           "Close the connection, with a farewell, after N failed logins "
           "or refused commands; 0 for no limit.", parse_count),
    Option("M", "map_library", "FILENAME",
           "/usr/lib/libperditiondb_gdbm.so.0",
           "Map library (a built-in name, a libperditiondb_<name>.so path "
           "or a Python file); empty for no map."),
    Option("m", "map_library_opt", "STRING", "",
           "Option string passed to the map library."),
    Option(None, "no_daemon", None, "", "Do not detach from terminal.",
           FLAG),
    Option("n", "no_lookup", None, "",
           "Do not resolve host or port names from maps; implies "
           "--no_bind_banner.", FLAG),
    Option("O", "ok_line", "STRING", "You are so in",
           "OK line sent to the client after a successful login.",
           parse_wire_text),
    Option("o", "server_resp_line", None, "",
           "Send the real server's response line to the client instead of "
           "the OK line.", FLAG, aliases=("server_ok_line",)),
    Option("P", "protocol", "PROTOCOL", "POP3",
           lambda: "Protocol: %s." % or_list(PROTOCOLS), parse_protocol),
    Option("p", "outgoing_port", "PORT", None,
           "Default real-server port (defaults as --listen_port).",
           parse_port),
    Option("s", "outgoing_server", "SERVER[,SERVER...]", "",
           "Servers for users not in the popmap, host[:port], used in round "
           "robin.", parse_servers),
    Option(None, "pid_file", "FILENAME", None,
           "Pid file, a full path, written outside inetd mode (in the "
           "foreground too) and removed at exit; empty for none (default "
           "<var_state_dir>/<basename>/<basename>.pid).", parse_pid_file),
    Option(None, "shutdown_timeout", "SECONDS", "10",
           "On SIGTERM or SIGINT, how long established sessions may run on "
           "before they are ended; 0 to end them at once.", parse_seconds),
    Option("S", "strip_domain", "STATE[,STATE...]", "",
           "Strip <delimiter>domain from the user name in the given states.",
           parse_states),
    Option("t", "timeout", "SECONDS", "1800",
           "Idle timeout after authentication; 0 for none.", parse_seconds),
    Option("u", "username", "USERNAME", "nobody", "User to run as."),
    Option("U", "username_from_database", None, "",
           "Log in to the real server with the user name from the popmap "
           "answer user<delimiter>host.", FLAG),
    Option(None, "forward_client_address", None, "",
           "Tell the real server the client's address: IMAP ID "
           "(x-originating-ip ...) where it offers ID, POP3 XCLIENT where "
           "its greeting or CAPA offers it, ManageSieve XCLIENT where its "
           "capabilities list it, as Dovecot takes them from its "
           "login_trusted_networks; with a hop count against loops.", FLAG),
    Option(None, "proxy_protocol", "NETWORK[,NETWORK...]", "",
           "Connections from these networks (address[/prefix]) start with "
           "a PROXY protocol header, version 1 or 2, that gives the "
           "client's address; others are refused.  Empty: off.",
           parse_networks),
    Option("q", "quiet", None, "", "Only log errors (overridden by -d).",
           FLAG),
    Option(None, "query_key", "FORMAT[,FORMAT...]", "",
           "Popmap keys to try in order; escapes \\U \\u \\D \\d \\i \\I "
           "\\p \\P \\\\ (default \\U).", parse_query_key),
    Option(None, "server_hold_time", "SECONDS", "10",
           "How long a real server found unreachable is skipped while "
           "others are left to try; 0 for never.", parse_seconds),
    Option(None, "ssl_mode", "MODE", None,
           lambda: "Comma list of %s (default none; %s: ssl_all)." % (
               ", ".join(SSL_MODES), or_list(
                   (e.name for e in PROTOCOLS.values() if e.ssl), "and")),
           parse_ssl_mode),
    Option(None, "ssl_ca_chain_file", "FILENAME", "",
           "CA certificates that complete the chain of --ssl_cert_file; "
           "overrides --ssl_ca_file and --ssl_ca_path."),
    Option(None, "ssl_ca_file", "FILENAME",
           SYSCONFDIR + "/perdition.ca.pem",
           "CA certificates to verify real servers with."),
    Option(None, "ssl_ca_path", "PATHNAME", SYSCONFDIR + "/perdition.ca/",
           "Directory of CA certificates (c_rehash) to verify real servers "
           "with."),
    Option(None, "ssl_ca_accept_self_signed", None, "",
           "Accept self-signed certificate authorities.", FLAG),
    Option(None, "ssl_cert_file", "FILENAME",
           SYSCONFDIR + "/perdition.crt.pem",
           "Certificate (PEM) for listening for SSL or TLS."),
    Option(None, "ssl_cert_accept_self_signed", None, "",
           "Accept self-signed real-server certificates.", FLAG),
    Option(None, "ssl_cert_accept_expired", None, "",
           "Accept expired certificates.", FLAG),
    Option(None, "ssl_cert_accept_not_yet_valid", None, "",
           "Accept certificates that are not yet valid.", FLAG),
    Option(None, "ssl_cert_verify_depth", "DEPTH", "9",
           "Chain depth to verify real-server certificates to.",
           parse_count),
    Option(None, "ssl_key_file", "FILENAME",
           SYSCONFDIR + "/perdition.key.pem",
           "Private key (PEM) for listening for SSL or TLS."),
    Option(None, "ssl_listen_ciphers", "STRING", "",
           "Cipher list for the listening side; empty: OpenSSL's default.  "
           "TLS 1.2 is the minimum unless the list has @SECLEVEL=0."),
    Option(None, "ssl_outgoing_ciphers", "STRING", "",
           "Cipher list for the outgoing side; empty: OpenSSL's default.  "
           "TLS 1.2 is the minimum unless the list has @SECLEVEL=0."),
    Option(None, "ssl_no_cert_verify", None, "",
           "Do not verify the real server's certificate.", FLAG),
    Option(None, "ssl_no_cn_verify", None, "",
           "Do not verify the real server's name against its certificate.",
           FLAG),
]
OPTIONS_BY_NAME = {}
for _option in OPTIONS:
    for _name in (_option.short, _option.long) + _option.aliases:
        if _name:
            OPTIONS_BY_NAME[_name] = _option
del _option, _name
NOT_IN_CONFIG_FILE = ("help", "config_file")


def program_name(argv0):
    """The basename perdition runs under, e.g. 'perdition.imap4s'."""
    name = os.path.basename(argv0 or "perdition")
    return name[:-3] if name.endswith(".py") else name


def next_argument(args, name, option):
    if not args:
        raise OptionError("option %s needs %s" % (name, option.arg))
    return args.pop(0)


def parse_command_line(args):
    """Split the command line into [(Option, raw value)] in order."""
    settings = []
    args = list(args)
    while args:
        arg = args.pop(0)
        if arg == "--":
            if args:
                raise OptionError("unexpected argument %r" % args[0])
            break
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            option = OPTIONS_BY_NAME.get(name)
            if option is None or len(name) == 1:
                raise OptionError("unknown option --%s" % name)
            if option.arg is None:
                settings.append((option, value if has_value else None))
                continue
            if not has_value:
                value = next_argument(args, "--" + name, option)
            settings.append((option, value))
        elif arg.startswith("-") and len(arg) > 1:
            letters = arg[1:]
            while letters:
                letter, letters = letters[0], letters[1:]
                option = OPTIONS_BY_NAME.get(letter)
                if option is None or option.short != letter:
                    raise OptionError("unknown option -%s" % letter)
                if option.arg is None:
                    settings.append((option, None))
                    continue
                if not letters:
                    letters = next_argument(args, "-" + letter, option)
                settings.append((option, letters))
                break
        else:
            raise OptionError("unexpected argument %r" % arg)
    return settings


def read_config_file(path):
    """Read perdition's configuration file syntax into [(line, key, value)].

    Keys are short or long option names; '#' starts a comment; a backslash
    makes the next character literal; '...' is all literal and "..." is
    literal but for "'" (as the manual says: the original nests a '...'
    there).  A backslash before a newline joins the two lines wherever it
    stands, inside quotes too, as the original reads it.  A key alone is a
    flag (value None).
    """
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    entries, chars, lineno, start_line = [], [], 1, 1
    i, quote = 0, None
    while i <= len(text):
        c = text[i] if i < len(text) else "\n"
        i += 1
        if quote:
            if c == "\\" and text[i:i + 1] == "\n":  # joins, even here
                i += 1
                lineno += 1
            elif c == quote[-1]:
                quote = quote[:-1]
            elif c == "\n" and i > len(text):
                raise OptionError("%s:%d: unterminated quote"
                                  % (path, start_line))
            elif c == "'" and quote == '"':     # '...' nests in "..."
                quote += c
            else:
                lineno += c == "\n"
                chars.append((c, True))
            continue
        if c == "\\":
            nxt = text[i] if i < len(text) else ""
            i += 1
            if nxt == "\n":
                lineno += 1
            elif nxt:
                chars.append((nxt, True))
            continue
        if c in "'\"":
            quote = c
            chars.append(("", True))    # marks an explicit (maybe empty) value
            continue
        if c == "#":        # a comment, continued by a final backslash
            while i < len(text) and text[i] != "\n":
                if text[i] == "\\" and text[i + 1:i + 2] == "\n":
                    i += 1
                    lineno += 1
                i += 1
            continue
        if c != "\n":
            chars.append((c, False))
            continue
        entry = split_config_line(chars)
        if entry:
            entries.append((start_line,) + entry)
        chars, lineno = [], lineno + 1
        start_line = lineno
    return entries


def split_config_line(chars):
    """[(char, literal)] of one logical line -> (key, value|None) or None."""
    while chars and not chars[0][1] and chars[0][0].isspace():
        chars.pop(0)
    while chars and not chars[-1][1] and chars[-1][0].isspace():
        chars.pop()
    if not chars:
        return None
    split = next((n for n, (c, literal) in enumerate(chars)
                  if not literal and c.isspace()), len(chars))
    key = "".join(c for c, _ in chars[:split])
    rest = chars[split:]
    while rest and not rest[0][1] and rest[0][0].isspace():
        rest.pop(0)
    value = "".join(c for c, _ in rest) if rest else None
    return key, value


# Options that only a restart can change: a reload keeps their values.
RESTART_ONLY = ("protocol", "bind_address", "listen_port", "username",
                "group", "inetd_mode", "no_daemon", "pid_file",
                "authenticate_in")


class Config:
    """The parsed options: one attribute per long option name.

    A reload reads the same `config_file` again, and `kept` holds the
    RESTART_ONLY values of the running configuration, which win over the
    file and the command line.
    """

    def __init__(self, argv=None, config_file=None, kept=None):
        argv = sys.argv if argv is None else argv
        self.argv = argv
        self.basename = program_name(argv[0] if argv else "perdition")
        command_line = parse_command_line(argv[1:])
        self.set_defaults()
        given = {}
        for option, value in command_line:
            given[option.long] = self.apply(option, value, "option %s"
                                            % option.names)
        self.given = set(given)
        if self.help:
            return
        protocol = given.get("protocol") or protocol_for_program(
            self.basename.partition(".")[2])
        self.protocol = protocol
        self.config_file = self.find_config_file(given.get("config_file")) \
            if config_file is None else config_file
        if self.config_file:
            self.read_file(self.config_file)
            for option, value in command_line:  # the command line wins
                self.apply(option, value, "option %s" % option.names)
        for name, value in (kept or {}).items():
            setattr(self, name, value)
        self.derive()

    def reread(self):
        """A new reading of the file found at start-up, with the command
        line over it; returns it and the RESTART_ONLY options the new
        reading would change, which keep their running values."""
        config = Config(self.argv, self.config_file)
        kept = {name: getattr(self, name) for name in RESTART_ONLY
                if getattr(config, name) != getattr(self, name)}
        if kept:
            config = Config(self.argv, self.config_file, kept)
        return config, kept

    def set_defaults(self):
        for option in OPTIONS:
            value = option.default
            if option.arg is None:
                value = False
            elif value is not None:
                value = option.parse(value)
            setattr(self, option.long, value)

    @staticmethod
    def apply_value(option, value):
        if option.arg is None:
            return parse_flag(value)
        if value is None:
            raise OptionError("needs %s" % option.arg)
        return option.parse(value)

    def apply(self, option, value, where):
        try:
            parsed = self.apply_value(option, value)
        except OptionError as e:
            raise OptionError("%s: %s" % (where, e)) from None
        setattr(self, option.long, parsed)
        return parsed

    def find_config_file(self, explicit):
        if explicit is not None:
            return explicit
        for name in (self.basename + ".conf",
                     "perdition.%s.conf" % self.protocol.lower(),
                     "perdition.conf"):
            path = os.path.join(SYSCONFDIR, name)
            if os.path.isfile(path):
                return path
        return ""

    def read_file(self, path):
        try:
            entries = read_config_file(path)
        except OSError as e:
            raise OptionError("%s: %s" % (path, e.strerror)) from None
        for lineno, key, value in entries:
            option = OPTIONS_BY_NAME.get(key)
            if option is None:
                raise OptionError("%s:%d: unknown option %r"
                                  % (path, lineno, key))
            if option.long in NOT_IN_CONFIG_FILE:
                continue
            self.apply(option, value, "%s:%d: %s" % (path, lineno, key))
            self.given.add(option.long)

    def derive(self):
        """Fill in what depends on other options; check combinations."""
        entry = PROTOCOLS[self.protocol]
        if self.listen_port is None:
            self.listen_port = entry.port
        if self.outgoing_port is None:
            self.outgoing_port = entry.port
        if self.capability is None:
            self.capability = entry.protocol_class.default_capability
        if self.ssl_mode is None:
            self.ssl_mode = frozenset(SSL_MODES["ssl_all"] if entry.ssl
                                      else ())
        if self.pid_file is None:
            self.pid_file = os.path.join(VAR_STATE_DIR, self.basename,
                                         self.basename + ".pid")
        if not self.query_key:
            self.query_key = ["\\U"]
        if self.no_lookup:
            self.no_bind_banner = True
        self.daemon = not (self.no_daemon or self.inetd_mode
                           or self.log_facility in ("-", "+"))

    def summary(self):
        """The start-up parameters, one line, for the log."""
        return ", ".join("%s=%s" % (o.long, format_value(getattr(self,
                                                                 o.long)))
                         for o in OPTIONS if o.long != "help")


def format_value(value):
    """An option's value as the start-up log shows it."""
    if isinstance(value, (set, frozenset)):
        return ",".join(sorted(value))
    if isinstance(value, Rate):
        return "%d/%d" % value
    if isinstance(value, tuple):            # add_domain: (states, depth)
        return "%s,%d" % (format_value(value[0]), value[1])
    if isinstance(value, list):     # servers, networks, query_key formats
        return ",".join(item if isinstance(item, str) else
                        str(item) if not isinstance(item, tuple) else
                        item[0] if item[1] is None else "%s:%d" % item
                        for item in value)
    return '"%s"' % value if isinstance(value, str) else str(value)


def usage(basename):
    """--help: every option from the table, with its default."""
    lines = ["perdition %s -- %s" % (__version__, what_perdition_is()),
             "usage: %s [options]" % basename, ""]
    for option in OPTIONS:
        head = option.names + (" " + option.arg if option.arg else "")
        lines.append(head + ":")
        if option.default is None:     # the help text gives the default
            lines.append("    " + option.help)
        else:
            lines.append("    %s (default %s)" % (option.help, "off"
                         if option.arg is None else '"%s"' % option.default))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

def _escape(c):
    if c in '"\\':
        return "\\" + c
    code = ord(c)
    if 0xdc80 <= code <= 0xdcff:        # an undecodable byte, as it came
        return "\\x%02x" % (code & 0xff)
    return "\\x%02x" % code if code < 0x100 else \
        "\\u%04x" % code if code < 0x10000 else "\\U%08x" % code


def log_text(text):
    """User-supplied text made safe for a log line: no one forges a line.

    Every character that is not printable (str.isprintable: controls, but
    also U+2028, U+2029, U+0085 and the rest that some log viewers take for
    a line break), quotes and backslashes are escaped, so a user name
    cannot start a new log entry and a '"' cannot end a field.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(c if c.isprintable() and c not in '"\\' else _escape(c)
                   for c in text)


class Log:
    """Logs to syslog, a file, stdout or stderr as -F says.

    Before the options are read, errors go to stderr.  Levels follow the
    manual: -q logs only errors, -d adds debugging messages.
    """

    def __init__(self):
        self.ident = "perdition"
        self.stream = sys.stderr
        self.use_syslog = False
        self.debug_enabled = False
        self.quiet = False
        self.lock = threading.Lock()
        self.facility = self.output = None      # as -F says, once read
        self._second = None
        self._stamp = ""

    def configure(self, config):
        self.switch(config, self.open(config))

    def target(self, config):
        """On a reload: what to log to with config, for switch().  -F is
        opened anew if it names something else now (OptionError if it
        cannot be: then the reload fails) or if logrotate moved the file
        away.  A file still in its place is kept, since perdition, no
        longer root, may not be able to open it again; a moved one that
        cannot be opened again is logged to where it is, and the log says
        why."""
        facility = config.log_facility
        if facility != self.facility:
            return self.open(config)
        try:
            if facility.startswith("/") and not os.path.samestat(
                    os.stat(facility), os.fstat(self.stream.fileno())):
                return self.open(config)
        except (OSError, OptionError) as e:
            self.err("Cannot reopen the log, still logging as before: %s"
                     % (e if isinstance(e, OptionError) else
                        "%s: %s" % (facility, e.strerror)))
        return self.output

    @staticmethod
    def open(config):
        """What -F names: a stream, or a syslog facility (an int).  A file
        is opened anew each time, so that a reload after logrotate renamed
        it writes to a new file of that name."""
        facility = config.log_facility
        if facility == "-":
            return sys.stdout
        if facility == "+":
            return sys.stderr
        if facility.startswith("/"):
            try:
                return open(facility, "a", buffering=1, encoding="utf-8",
                            errors="replace")
            except OSError as e:
                raise OptionError("option -F, --log_facility: %s: %s"
                                  % (facility, e.strerror)) from None
        return getattr(syslog, "LOG_" + facility.upper())

    def switch(self, config, output):
        """Log to `output` (from open()) at config's levels from now on;
        a file logged to before is closed."""
        self.ident = config.basename
        self.debug_enabled = config.debug
        self.quiet = config.quiet and not config.debug
        self.facility, self.output = config.log_facility, output
        use_syslog = isinstance(output, int)
        if use_syslog:
            syslog.openlog(self.ident, syslog.LOG_PID, output)
        with self.lock:
            old = self.stream
            self.stream = sys.stderr if use_syslog else output
            self.use_syslog = use_syslog
        if old not in (self.stream, sys.stdout, sys.stderr):
            old.close()

    def write(self, priority, message):
        if self.use_syslog:
            syslog.syslog(priority, message)
            return
        now = int(time.time())
        with self.lock:
            if now != self._second:     # a timestamp made once a second
                self._second = now
                self._stamp = "%s %s[%d]: " % (time.strftime(
                    "%b %d %H:%M:%S", time.localtime(now)), self.ident,
                    os.getpid())
            try:
                self.stream.write(self._stamp + message + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def forked(self):
        """A new process: the next line makes a stamp with the new pid."""
        self._second = None

    def err(self, message):
        self.write(syslog.LOG_ERR, message)

    def info(self, message):
        if not self.quiet:
            self.write(syslog.LOG_INFO, message)

    def debug(self, message):
        if self.debug_enabled:
            self.write(syslog.LOG_DEBUG, message)


log = Log()


# ---------------------------------------------------------------------------
# User-name handling
# ---------------------------------------------------------------------------

class UserNames:
    """The manual's user-name rewriting, per state.

    A name passes through strip_domain, add_domain and lower_case for the
    state it is used in: servername_lookup (the popmap key),
    local_authentication and remote_login (the name sent to the real server).
    """

    def __init__(self, config):
        self.delimiter = config.domain_delimiter
        self.strip_states = config.strip_domain
        self.add_states, self.strip_depth = config.add_domain
        self.explicit_domain = config.explicit_domain
        self.lower_states = config.lower_case
        self.query_key = config.query_key
        self._domains = {}
        self._domains_lock = threading.Lock()

    def split(self, user):
        """'user@domain' -> ('user', 'domain'); the last delimiter counts."""
        local, sep, domain = user.rpartition(self.delimiter)
        return (local, domain) if sep and self.delimiter else (user, "")

    def rewrite(self, user, state, server_ip):
        if state in self.strip_states:
            user = self.split(user)[0]
        # As in the original, a name that has a domain keeps it.
        if state in self.add_states and self.delimiter not in user:
            domain = self.domain_for(server_ip)
            if domain:
                user = user + self.delimiter + domain
        if state in self.lower_states:
            user = user.lower()
        return user

    def domain_for(self, server_ip):
        """The domain to add: --explicit_domain or the reverse lookup of the
        address the client connected to, less strip_depth leading labels."""
        if self.explicit_domain:
            return self.explicit_domain
        with self._domains_lock:
            if server_ip in self._domains:
                return self._domains[server_ip]
        try:
            name = socket.gethostbyaddr(server_ip)[0]
        except (OSError, UnicodeError):
            name = ""
        if name and not HOSTNAME_RE.match(name):
            log.err("Reverse lookup of %s gave an invalid host name %s"
                    % (server_ip, log_text(name)))
            name = ""
        labels = name.rstrip(".").split(".") if name else []
        domain = ".".join(labels[self.strip_depth:]) \
            if len(labels) > self.strip_depth else ""
        with self._domains_lock:
            self._domains[server_ip] = domain
        return domain

    def query_keys(self, user, session):
        """The popmap keys to try, in order, from --query_key."""
        local, domain = self.split(user)
        values = {"U": user, "u": local, "D": self.delimiter, "d": domain,
                  "i": session.client_ip, "I": session.server_ip,
                  "p": str(session.client_port),
                  "P": str(session.server_port), "\\": "\\"}
        return [re.sub(r"\\(.)", lambda m: values[m.group(1)], fmt)
                for fmt in self.query_key]


# ---------------------------------------------------------------------------
# Local authentication
# ---------------------------------------------------------------------------

# -a asks Linux-PAM, through ctypes, whether the user may log in, before any
# real server is contacted.
LIBPAM = "libpam.so.0"
PAM_SERVICE = "perdition"
# A directory of PAM service files used instead of the system's (/etc/pam.d),
# as PERDITION_SYSCONFDIR moves /etc/perdition; the tests bring their own.
PAM_CONFDIR = os.environ.get("PERDITION_PAM_CONFDIR", "")
# Linux-PAM's numbers (security/_pam_types.h).
PAM_SUCCESS = 0
PAM_BUF_ERR = 5
PAM_CONV_ERR = 19
PAM_RHOST = 4
PAM_DISALLOW_NULL_AUTHTOK = 0x0001
PAM_PROMPT_ECHO_OFF = 1         # message styles; 2 is PAM_PROMPT_ECHO_ON
PAM_ERROR_MSG = 3
PAM_TEXT_INFO = 4
PAM_MAX_NUM_MSG = 32            # the most messages PAM sends in one call


class PamMessage(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class PamResponse(ctypes.Structure):
    # resp is a void pointer: it holds memory from malloc that PAM frees.
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


PAM_CONV_FUNC = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.POINTER(PamMessage)),
    ctypes.POINTER(ctypes.POINTER(PamResponse)), ctypes.c_void_p)


class PamConv(ctypes.Structure):
    _fields_ = [("conv", PAM_CONV_FUNC), ("appdata_ptr", ctypes.c_void_p)]


class PAM:
    """Local authentication: pam_authenticate and pam_acct_mgmt for the
    service 'perdition', with the password the client gave.

    libpam is loaded once, at start-up and before privileges are dropped,
    and lives as long as the process.  Each login gets a PAM handle of its
    own in the session's thread; ctypes lets go of the GIL around every PAM
    call, so a module that waits on the network holds up no other session.
    """

    # (name, result, arguments) of the libpam and libc functions used.
    PROTOTYPES = [
        ("pam_start", ctypes.c_int, [ctypes.c_char_p, ctypes.c_char_p,
                                     ctypes.POINTER(PamConv),
                                     ctypes.POINTER(ctypes.c_void_p)]),
        ("pam_set_item", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_char_p]),
        ("pam_authenticate", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
        ("pam_acct_mgmt", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
        ("pam_end", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
        ("pam_strerror", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int]),
    ]
    CONFDIR_PROTOTYPE = (
        "pam_start_confdir", ctypes.c_int,
        [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(PamConv),
         ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)])
    LIBC_PROTOTYPES = [
        ("calloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
        ("strdup", ctypes.c_void_p, [ctypes.c_char_p]),
        ("free", None, [ctypes.c_void_p]),
    ]

    def __init__(self, confdir=PAM_CONFDIR):
        where = "option -a, --authenticate_in: "
        try:
            self.lib = ctypes.CDLL(LIBPAM)
        except OSError as e:
            raise OptionError("%scannot load %s for local (PAM) "
                              "authentication: %s" % (where, LIBPAM, e)) \
                from None
        self.confdir = os.fsencode(confdir) if confdir else None
        prototypes = self.PROTOTYPES + [self.CONFDIR_PROTOTYPE] * bool(
            confdir)
        for name, result, arguments in prototypes:
            if not hasattr(self.lib, name):
                raise OptionError("%s%s has no %s%s" % (
                    where, LIBPAM, name, " (PERDITION_PAM_CONFDIR needs "
                    "Linux-PAM 1.4 or later)" if name.endswith("confdir")
                    else ""))
            self.declare(self.lib, name, result, arguments)
        # PAM frees the replies with the free() of the C library it uses:
        # the process's own, found through the program's symbols.
        self.libc = ctypes.CDLL(None)
        for name, result, arguments in self.LIBC_PROTOTYPES:
            self.declare(self.libc, name, result, arguments)
        # One callback for the life of the process: PAM may call it at any
        # time until pam_end, so it must outlive every handle.
        self.conversation = PAM_CONV_FUNC(self.converse)

    @staticmethod
    def declare(library, name, result, arguments):
        function = getattr(library, name)
        function.restype, function.argtypes = result, arguments

    def authenticate(self, user, password, client_ip):
        """Return if PAM accepts `user` with `password`; raise LoginFailure
        saying which step refused, and why, if it does not."""
        user = user.encode("utf-8", "surrogateescape")
        password = password.encode("utf-8", "surrogateescape")
        if b"\0" in user or b"\0" in password:    # C strings would cut them
            raise LoginFailure("Local authentication failed: NUL in user "
                               "name or password")
        secret = ctypes.create_string_buffer(password)
        conv = PamConv(self.conversation, ctypes.cast(secret,
                                                      ctypes.c_void_p))
        handle = ctypes.c_void_p()
        steps = [("pam_set_item", self.lib.pam_set_item, PAM_RHOST,
                  client_ip.encode()),
                 ("pam_authenticate", self.lib.pam_authenticate,
                  PAM_DISALLOW_NULL_AUTHTOK),
                 ("pam_acct_mgmt", self.lib.pam_acct_mgmt,
                  PAM_DISALLOW_NULL_AUTHTOK)]
        status = PAM_SUCCESS
        try:
            if self.confdir:
                status = self.lib.pam_start_confdir(
                    PAM_SERVICE.encode(), user, ctypes.byref(conv),
                    self.confdir, ctypes.byref(handle))
            else:
                status = self.lib.pam_start(PAM_SERVICE.encode(), user,
                                            ctypes.byref(conv),
                                            ctypes.byref(handle))
            if status != PAM_SUCCESS:
                raise LoginFailure(self.failure(None, "pam_start", status))
            for step, call, *arguments in steps:
                status = call(handle, *arguments)
                if status != PAM_SUCCESS:
                    raise LoginFailure(self.failure(handle, step, status))
        finally:
            if handle.value:    # a failed pam_start leaves no handle
                self.lib.pam_end(handle, status)

    def failure(self, handle, step, status):
        reason = self.lib.pam_strerror(handle, status)
        return "Local authentication failed: %s: %s" % (
            step, reason.decode("utf-8", "replace") if reason else status)

    def converse(self, count, messages, responses, appdata):
        """PAM's conversation function.  The password prompt (echo off) is
        answered with the client's password; notices and error messages
        need no answer; any other prompt (echo on: a user name, a one-time
        code) has no answer here and fails the conversation.  The replies
        are allocated with malloc, since PAM frees them."""
        if not 0 < count <= PAM_MAX_NUM_MSG:
            return PAM_CONV_ERR
        replies = self.libc.calloc(count, ctypes.sizeof(PamResponse))
        if not replies:
            return PAM_BUF_ERR
        reply = ctypes.cast(replies, ctypes.POINTER(PamResponse))
        status = PAM_SUCCESS
        try:
            password = ctypes.cast(appdata, ctypes.c_char_p).value
            for i in range(count):
                style = messages[i].contents.msg_style
                if style == PAM_PROMPT_ECHO_OFF:
                    reply[i].resp = self.libc.strdup(password)
                    if not reply[i].resp:
                        status = PAM_BUF_ERR
                        break
                elif style not in (PAM_ERROR_MSG, PAM_TEXT_INFO):
                    status = PAM_CONV_ERR
                    break
        except Exception:       # ctypes would return an undefined result
            status = PAM_CONV_ERR
        if status != PAM_SUCCESS:
            for i in range(count):
                self.libc.free(reply[i].resp)
            self.libc.free(replies)
            return status
        responses[0] = reply
        return PAM_SUCCESS


# ---------------------------------------------------------------------------
# Back-end selection
# ---------------------------------------------------------------------------

class Backend:
    """Where, as whom and with what password to log in: the outcome of the
    server lookup (an http map may give another user name or password).

    `servers` are the (host, port) to try in order, each after the one
    before could not be reached; `host` and `port` are the one tried last,
    the one used once the login has succeeded."""

    def __init__(self, servers, user, password):
        self.servers = servers
        self.host, self.port = servers[0]
        self.user, self.password = user, password


class ServerHolds:
    """--server_hold_time: the real servers found unreachable lately, and
    until when each is skipped, so that not every user pays a connect
    timeout.  Process-wide; expired entries go when a new one comes."""

    def __init__(self):
        self._until = {}        # (host, port) -> monotonic time
        self._lock = threading.Lock()

    def order(self, servers):
        """The servers to try: those not held back, or all of them when
        every one is (trying all again beats trying none)."""
        if not self._until:         # the usual case: none held
            return servers
        now = time.monotonic()
        with self._lock:
            open_ = [s for s in servers if self._until.get(s, 0) <= now]
        return open_ or servers

    def hold(self, server, seconds):
        now = time.monotonic()
        with self._lock:
            for held in [s for s, until in self._until.items()
                         if until <= now]:
                del self._until[held]
            self._until[server] = now + seconds


class ServerSelector:
    """Chooses the real server for a user.

    In order: a server the client named itself (-c), the popmap (tried with
    each --query_key), then --outgoing_server in round robin.
    """

    def __init__(self, config, popmap, user_names):
        self.config = config
        self.popmap = popmap
        self.user_names = user_names
        self._round_robin = itertools.cycle(range(len(
            config.outgoing_server))) if config.outgoing_server else None
        self._lock = threading.Lock()

    def select(self, user, password, session):
        config = self.config
        rewrite = self.user_names.rewrite
        if config.client_server_specification:
            name, server = self.user_names.split(user)
            if server:
                return Backend(self.parse_answer(server, "client"),
                               rewrite(name, "remote_login",
                                       session.server_ip), password)
        login_user = rewrite(user, "remote_login", session.server_ip)
        context = self.lookup_context(user, password, session)
        answer = self.lookup(rewrite(user, "servername_lookup",
                                     session.server_ip), context, session)
        if answer:
            map_user, sep, servers = answer.rpartition(
                config.domain_delimiter)
            servers = self.parse_answer(servers, "popmap")
            if sep and config.username_from_database:
                login_user = map_user
            return Backend(servers, login_user, context.password)
        if self._round_robin is None:
            raise LoginFailure("Could not determine server",
                               "Could not determine server")
        with self._lock:
            first = next(self._round_robin)
        servers = [(host, port or config.outgoing_port)
                   for host, port in config.outgoing_server]
        return Backend(servers[first:] + servers[:first], login_user,
                       password)

    def lookup_context(self, user, password, session):
        if self.popmap is None:
            return None
        return perdition_maps.LookupContext(
            user=user, password=password, protocol=session.protocol.map_name,
            client_ip=session.client_ip, client_port=session.client_port,
            server_ip=session.server_ip, server_port=session.server_port,
            domain_delimiter=self.config.domain_delimiter,
            attempt=session.attempts)

    def lookup(self, user, context, session):
        """The first answer of the popmap for the --query_key keys."""
        if self.popmap is None:
            return None
        for key in self.user_names.query_keys(user, session):
            try:
                answer = self.popmap.lookup(key, context)
            except perdition_maps.MapRefused as e:
                cause = e.__cause__
                log.info("Map refused %s: %s%s" % (
                    log_text(key), e, " (%s)" % cause if cause else ""))
                raise LoginFailure(str(e), str(e)) from None
            except Exception as e:   # a broken map is no answer
                log.err("Map lookup of %s failed: %s" % (log_text(key), e))
                answer = None
            log.debug("Map lookup of %s: %s" % (log_text(key),
                                                log_text(answer or "none")))
            if answer:
                return answer.strip()
        return None

    def parse_answer(self, answer, source):
        """host[:port][,host[:port]...] from a map or a client, each
        validated before use -> [(host, port)]."""
        servers = [self.parse_server(server.strip(), source)
                   for server in answer.split(",") if server.strip()]
        if not servers:
            log.err("No server in %s from %s" % (log_text(answer), source))
            raise LoginFailure("Invalid server from %s" % source,
                               "Could not determine server")
        return servers

    def parse_server(self, server, source):
        """Validate one host[:port] from a map or a client."""
        try:
            host, port = split_host_port(server)
            host = parse_host(host)
            if port is not None:
                if self.config.no_lookup and not port.isdigit():
                    raise OptionError("port %r is not a number" % port)
                port = parse_port(port)
        except OptionError as e:
            log.err("Invalid server %s from %s: %s"
                    % (log_text(server), source, e))
            raise LoginFailure("Invalid server from %s" % source,
                               "Could not determine server") from None
        if self.config.no_lookup:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                log.err("Server %s from %s is not an IP address and "
                        "no_lookup is set" % (log_text(host), source))
                raise LoginFailure("Invalid server from %s" % source,
                                   "Could not determine server") from None
        return host, port or self.config.outgoing_port


# ---------------------------------------------------------------------------
# TLS and connections
# ---------------------------------------------------------------------------

X509_V_FLAG_NO_CHECK_TIME = 0x200000


def _load(what, action, *args):
    """Run a context set-up step; a failure names the option and file."""
    try:
        return action(*args)
    except (OSError, ssl.SSLError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise OptionError("option --%s: %s: %s"
                          % (what, " ".join(a for a in args
                                            if isinstance(a, str)), reason))


def new_context(protocol, option, ciphers):
    """A context with modern defaults: TLS 1.2 at least, unless the cipher
    list lowers OpenSSL's security level to 0, the one level at which
    TLS 1.0 and 1.1 still work: then whatever OpenSSL supports."""
    context = ssl.SSLContext(protocol)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        _load(option, context.set_ciphers, ciphers)
        if "@SECLEVEL=0" in ciphers.upper():
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    return context


def make_listen_context(config):
    """The server-side context, made once at start-up (before privileges
    are dropped, so the key may be readable by root only)."""
    context = new_context(ssl.PROTOCOL_TLS_SERVER, "ssl_listen_ciphers",
                          config.ssl_listen_ciphers)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    for name in ("ssl_cert_file", "ssl_key_file", "ssl_ca_chain_file"):
        path = getattr(config, name)
        if path and not os.access(path, os.R_OK):
            raise OptionError("option --%s: %s: %s" % (
                name, path, "No such file" if not os.path.exists(path)
                else "Permission denied"))
    if config.ssl_ca_chain_file:
        # The chain is sent after the certificate: load both as one PEM.
        with open(config.ssl_cert_file, "rb") as cert, \
                open(config.ssl_ca_chain_file, "rb") as chain, \
                tempfile.NamedTemporaryFile(suffix=".pem") as combined:
            combined.write(cert.read().rstrip(b"\n") + b"\n" + chain.read())
            combined.flush()
            _load("ssl_cert_file", context.load_cert_chain, combined.name,
                  config.ssl_key_file)
    else:
        _load("ssl_cert_file", context.load_cert_chain, config.ssl_cert_file,
              config.ssl_key_file)
    return context


def make_outgoing_context(config, trust=None):
    """The client-side context: verification is on unless options say not.

    `trust` is one certificate (DER) to trust instead of the CA files, for
    a real server whose self-signed certificate --ssl_*_accept_self_signed
    allows.
    """
    context = new_context(ssl.PROTOCOL_TLS_CLIENT, "ssl_outgoing_ciphers",
                          config.ssl_outgoing_ciphers)
    if config.ssl_no_cert_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    context.check_hostname = not config.ssl_no_cn_verify
    if trust is not None:
        # That certificate is all its server is trusted with; the CA files
        # were read at start-up, as root, and may be unreadable now.
        context.load_verify_locations(cadata=trust)
    elif config.ssl_ca_chain_file:
        _load("ssl_ca_chain_file", context.load_verify_locations,
              config.ssl_ca_chain_file)
    else:
        loaded = False
        for name, keyword in (("ssl_ca_file", "cafile"),
                              ("ssl_ca_path", "capath")):
            path = getattr(config, name)
            if path and (name in config.given or os.path.exists(path)):
                # OpenSSL looks into a CA directory only when verifying.
                if keyword == "capath" and not os.path.isdir(path):
                    raise OptionError("option --ssl_ca_path: %s: No such "
                                      "directory" % path)
                _load(name, lambda p, k=keyword:
                      context.load_verify_locations(**{k: p}), path)
                loaded = True
        if not loaded:
            context.load_default_certs()
    if config.ssl_cert_accept_expired or config.ssl_cert_accept_not_yet_valid:
        context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    return context


class OutgoingTLS:
    """TLS towards real servers: the context, and what OpenSSL's own
    verification leaves to us.

    Python's ssl cannot accept a single verification error, so a real server
    whose self-signed certificate --ssl_cert_accept_self_signed (or whose
    self-signed CA --ssl_ca_accept_self_signed) allows is learned on a probe
    connection and then trusted for that host and port: from then on its
    name, dates and signature are verified as any other.  Accepting
    expired or not yet valid certificates switches OpenSSL's time check off
    and checks the date that is not accepted here.
    """

    SELF_SIGNED = 18            # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    SELF_SIGNED_IN_CHAIN = 19   # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN

    def __init__(self, config):
        self.config = config
        self.context = make_outgoing_context(config)
        self.accepted_codes = set()
        if config.ssl_cert_accept_self_signed:
            self.accepted_codes.add(self.SELF_SIGNED)
        if config.ssl_ca_accept_self_signed:
            self.accepted_codes.add(self.SELF_SIGNED_IN_CHAIN)
        self.probe_context = None
        if self.accepted_codes and not config.ssl_no_cert_verify:
            self.probe_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.probe_context.check_hostname = False
            self.probe_context.verify_mode = ssl.CERT_NONE
        self._pinned = {}       # (host, port) -> context trusting its cert
        self._lock = threading.Lock()

    def context_for(self, host, port, probe=False):
        if probe:
            return self.probe_context
        with self._lock:
            return self._pinned.get((host, port), self.context)

    def pin(self, host, port, connection, code):
        """Trust the self-signed certificate (code 18) or self-signed CA
        (code 19) that the probe connection showed."""
        chain = connection.tls._sslobj.get_unverified_chain() or []
        cert = (chain[:1] if code == self.SELF_SIGNED else chain[-1:])
        if not cert or cert[0].get_info().get("issuer") != \
                cert[0].get_info().get("subject"):
            raise ssl.SSLError("the server's certificate is not self-signed")
        context = make_outgoing_context(self.config,
                                        trust=cert[0].public_bytes())
        with self._lock:
            self._pinned[(host, port)] = context
        log.info("Trusting the self-signed certificate of %s port %d"
                 % (host, port))

    def check(self, connection):
        """Checks after a verified handshake."""
        config = self.config
        if config.ssl_no_cert_verify:
            return
        chain = connection.tls._sslobj.get_verified_chain()
        if len(chain) - 1 > config.ssl_cert_verify_depth:
            raise ssl.SSLError("certificate chain longer than "
                               "ssl_cert_verify_depth %d"
                               % config.ssl_cert_verify_depth)
        now = time.time()
        for cert in (c.get_info() for c in chain):    # the CAs' dates too
            if not config.ssl_cert_accept_expired and \
                    ssl.cert_time_to_seconds(cert["notAfter"]) < now:
                raise ssl.SSLError("certificate has expired")
            if not config.ssl_cert_accept_not_yet_valid and \
                    ssl.cert_time_to_seconds(cert["notBefore"]) > now:
                raise ssl.SSLError("certificate is not yet valid")


class Connection:
    """One leg of a session: a socket, plaintext or TLS.

    TLS runs through ssl.MemoryBIO so that the two pump threads can use one
    connection at once: OpenSSL must never see concurrent calls on one SSL
    object, so every call on it holds `_tls_lock`, while the socket reads
    and writes happen outside that lock.  `_send_lock` keeps the records on
    the wire in the order OpenSSL made them.
    """

    __slots__ = ("sock", "buffer", "tls", "watched", "wait", "deadline",
                 "_poller", "_incoming", "_outgoing", "_tls_lock",
                 "_send_lock", "_shut")

    def __init__(self, sock, watched=None, wait=None, deadline=None):
        self.sock = sock
        self.buffer = bytearray()   # read but not yet consumed
        self.tls = None
        # The client, while this real server's login is under way: every
        # wait for the server also watches for the client's departure, and
        # lasts at most `wait` seconds (None: no limit; the socket's own
        # timeout is for sends) ...
        self.watched = watched
        self.wait = wait
        # ... and ends by this time.monotonic(), if set (--connect_timeout
        # until the greeting and TLS are done, however slowly they trickle).
        self.deadline = deadline
        self._poller = None         # made at the first wait, for all
        self._shut = None           # how it was shut down, if it was

    def fileno(self):
        return self.sock.fileno()

    def settimeout(self, seconds):
        self.sock.settimeout(seconds or None)

    def start_tls(self, context, server_side, server_hostname=None):
        """Handshake now.  Whatever was read before is discarded: plaintext
        sent ahead of the handshake must never count as protected data."""
        self.buffer.clear()
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        tls = context.wrap_bio(self._incoming, self._outgoing,
                               server_side=server_side,
                               server_hostname=server_hostname)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_raw(self._outgoing.read())
                data = self._receive(BUFFER_SIZE)
                if not data:
                    raise ssl.SSLEOFError("EOF during TLS handshake")
                self._incoming.write(data)
            except ssl.SSLError:    # the peer learns why from the alert
                try:
                    self.sock.send(self._outgoing.read(), socket.MSG_DONTWAIT)
                except OSError:
                    pass
                raise
        self._send_raw(self._outgoing.read())
        self.tls = tls

    def _send_raw(self, data):
        if data:
            self.sock.sendall(data)

    def _watch(self, timeout):
        """Poll for this socket's input and for the departure of the
        watched client, which has gone once it has shut its side
        (POLLRDHUP, which its pipelined input does not trigger): then no
        one waits for this server's answer any more, ClientGone."""
        gone = self.watched.sock.fileno()
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            poller.register(gone, select.POLLRDHUP)
        events = poller.poll(timeout)
        for fd, _ in events:
            if fd == gone:
                raise ClientGone
        return events

    def _receive(self, size):
        """One read from the socket.  A watched connection waits for input
        or the client's departure, up to the socket's timeout or the
        deadline, then reads what the wait found with os.read on its
        descriptor: the socket's own timeout would poll once more, and
        each such call lets the other threads take the interpreter."""
        if self.watched is None:
            return self.sock.recv(size)
        while True:
            timeout = self.wait
            if self.deadline is not None:
                left = max(0.0, self.deadline - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            if not self._watch(None if timeout is None else timeout * 1000):
                raise TimeoutError("timed out")
            try:
                return os.read(self.sock.fileno(), size)
            except BlockingIOError:     # woken for nothing
                pass

    def check_watched(self):
        """ClientGone now if the watched client has left."""
        if self.watched is not None:
            self._watch(0)

    def _recv(self, size):
        """Read from the socket (through TLS if on); b'' at EOF."""
        if self.tls is None:
            return self._receive(size)
        while True:
            with self._tls_lock:
                data = self._read_records(size)
                pending = self._outgoing.pending
            if pending and self._send_lock.acquire(blocking=False):
                self._send_pending()
            if data is not None:
                return data
            # Wait without holding a buffer: idle sessions are many.
            if self.watched is None and \
                    not self.sock.recv(1, socket.MSG_PEEK):
                return b""
            raw = self._receive(BUFFER_SIZE)
            if not raw:
                return b""
            with self._tls_lock:
                self._incoming.write(raw)

    def _read_records(self, size):
        """Up to `size` bytes of plaintext, as many records as are in;
        None when a record is incomplete, b'' at the end.  Called holding
        _tls_lock."""
        chunks, total = [], 0
        try:
            while total < size:
                chunk = self.tls.read(size - total)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        except ssl.SSLWantReadError:
            if not chunks:
                return None
        except ssl.SSLZeroReturnError:
            pass
        return b"".join(chunks)

    def _send_pending(self):
        """Send what OpenSSL has made; called holding _send_lock, which it
        releases once nothing is left (checked under _tls_lock, so that a
        record made meanwhile is never stranded)."""
        try:
            while True:
                with self._tls_lock:
                    data = self._outgoing.read()
                    if not data:
                        self._send_lock.release()
                        return
                self.sock.sendall(data)
        except BaseException:
            self._send_lock.release()
            raise

    def sendall(self, data):
        if self.tls is None:
            self.sock.sendall(data)
            return
        self._send_lock.acquire()
        try:
            with self._tls_lock:
                self.tls.write(data)
        except BaseException:
            self._send_lock.release()
            raise
        self._send_pending()

    def recv(self, size=BUFFER_SIZE):
        if self.buffer:
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            return data
        return self._recv(size)

    def readline(self, limit=MAX_LINE):
        """One line without its CRLF (or LF).  EOFError at end of input;
        ProtocolError when the line is longer than `limit`."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                if end > limit:
                    raise ProtocolError("Line too long")
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buffer) > limit:
                raise ProtocolError("Line too long")
            start = len(self.buffer)
            data = self._recv(LINE_READ)
            if not data:
                raise EOFError
            self.buffer += data

    def read_exact(self, size):
        while len(self.buffer) < size:
            data = self._recv(LINE_READ)
            if not data:
                raise EOFError
            self.buffer += data
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def shutdown(self, how=socket.SHUT_RDWR):
        """Each end of a session shuts its sockets down from both pump
        threads and the session: only the first call of a kind is made."""
        if self._shut in (how, socket.SHUT_RDWR):
            return
        if self.tls is not None and self._shut is None:
            self._close_notify()
        self._shut = how
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    def _close_notify(self):
        """TLS ends with a close_notify alert; without it clients such as
        openssl s_client report a truncation.  Skipped while the other
        thread is sending: records must not interleave."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            with self._tls_lock:
                try:
                    self.tls.unwrap()
                except ssl.SSLError:    # the peer's close_notify is not in
                    pass
                data = self._outgoing.read()
            self.sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            self._send_lock.release()

    def linger(self):
        """Close our side, then read and drop what the peer still sends,
        for a bounded time and amount.  Closing with unread input would
        reset the connection, and the peer might never read our error."""
        self.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_TIME
        dropped = 0
        try:
            while dropped < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.sock.settimeout(left)
                data = self.sock.recv(BUFFER_SIZE)
                if not data:
                    break
                dropped += len(data)
        except OSError:
            pass

    def close(self):
        self.shutdown()
        self.sock.close()


PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_header_length(data):
    """The length of the PROXY header that `data` begins with, or None
    while `data` could still become one; ProtocolError when it cannot."""
    if PROXY_V2_SIGNATURE.startswith(data[:12]):
        if len(data) < 16:
            return None
        length = 16 + int.from_bytes(data[14:16], "big")
        if length > PROXY_HEADER_MAX:
            raise ProtocolError("PROXY header of %d bytes is too long"
                                % length)
        return length
    if not b"PROXY ".startswith(data[:6]):
        raise ProtocolError("not a PROXY protocol header")
    end = data.find(b"\r\n", 0, 107)
    if end >= 0:
        return end + 2
    if len(data) >= 107:
        raise ProtocolError("PROXY header line is too long")
    return None


def read_proxy_header(sock, timeout):
    """Read a PROXY protocol header, exactly and no byte more (an implicit
    TLS client hello may follow it), within `timeout` seconds.

    Returns ((client ip, port), (server ip, port)) as the balancer saw the
    connection, or None where the header gives no addresses (a v2 LOCAL
    health check, v1 UNKNOWN, an address family other than TCP).
    ProtocolError for a bad header, TimeoutError, EOFError."""
    header = b""
    deadline = time.monotonic() + timeout
    while True:
        left = max(deadline - time.monotonic(), 0.001)
        sock.settimeout(left)
        try:
            peeked = sock.recv(PROXY_HEADER_MAX - len(header),
                               socket.MSG_PEEK)
        except TimeoutError:
            raise TimeoutError("no PROXY header within %g s"
                               % timeout) from None
        if not peeked:
            raise EOFError
        length = proxy_header_length(header + peeked)
        # Without the end in sight, all that has come is header.
        header += sock.recv(len(peeked) if length is None
                            else length - len(header))
        if length is not None and len(header) == length:
            return parse_proxy_header(header)


def parse_proxy_header(header):
    if header.startswith(PROXY_V2_SIGNATURE):
        command, family = header[12], header[13]
        if command >> 4 != 2 or command & 0xf > 1:
            raise ProtocolError("unknown PROXY v2 command 0x%02x" % command)
        size = {0x11: 4, 0x21: 16}.get(family)
        if command & 0xf == 0 or size is None:
            return None         # LOCAL, or not TCP: the balancer's own
        body = header[16:]
        if len(body) < 2 * size + 4:
            raise ProtocolError("PROXY v2 header too short for its "
                                "addresses")
        addresses = [ipaddress.ip_address(body[n * size:(n + 1) * size])
                     for n in (0, 1)]
        ports = struct.unpack("!HH", body[2 * size:2 * size + 4])
    else:
        words = header[:-2].decode("ascii", "replace").split(" ")
        if words[1:2] == ["UNKNOWN"]:
            return None
        try:
            if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
                raise ValueError
            addresses = [ipaddress.ip_address(w) for w in words[2:4]]
            if any(a.version != int(words[1][3]) for a in addresses) or \
                    not all(w.isdigit() and len(w) <= 5 for w in words[4:]):
                raise ValueError
            ports = [int(w) for w in words[4:]]
            if max(ports) > 65535:
                raise ValueError
        except ValueError:
            raise ProtocolError("malformed PROXY header %s"
                                % log_text(header[:-2])) from None
    # An IPv4-mapped IPv6 address is logged and matched as IPv4.
    return tuple((str(getattr(address, "ipv4_mapped", None) or address), port)
                 for address, port in zip(addresses, ports))


# ---------------------------------------------------------------------------
# The protocols
# ---------------------------------------------------------------------------

MAX_COMMAND = 65536     # one command with all its literals before login
QUIT = "quit"           # a command handler's answer: the client leaves


class BadCommand(Exception):
    """A command the client may correct: answered with -ERR or BAD."""


def has_controls(text):
    return any(ord(c) < 0x20 or ord(c) == 0x7f for c in text)


def or_list(words, conjunction="or"):
    """['a', 'b', 'c'] -> 'a, b or c', for messages and help texts."""
    words = list(words)
    return (" %s " % conjunction).join(filter(None, (", ".join(words[:-1]),
                                                     words[-1])))


class Credentials:
    """What a client logs in with: USER/PASS, LOGIN or SASL PLAIN.
    `authzid` is a SASL authorisation identity other than the user."""

    __slots__ = ("user", "password", "authzid")

    def __init__(self, user, password, authzid=""):
        self.user, self.password, self.authzid = user, password, authzid


class Command:
    """One row of a protocol's command table, as aiosmtpd and imaplib keep
    theirs: the method that handles the verb, and where it is allowed.

    `before_tls`: on a plaintext connection on which TLS is still on offer;
    `after_tls`: once TLS is on, or where none is on offer;
    `login_disabled`: while logging in is not allowed (--login_disabled,
    or tls_listen_force before TLS);
    `credentials`: its arguments carry a password, masked in the log;
    `option`: the flag without which the command does not exist.
    """

    __slots__ = ("verb", "handler", "before_tls", "after_tls",
                 "login_disabled", "credentials", "option")

    def __init__(self, verb, handler, before_tls=True, after_tls=True,
                 login_disabled=True, credentials=False, option=None):
        self.verb, self.handler = verb, handler
        self.before_tls, self.after_tls = before_tls, after_tls
        self.login_disabled, self.credentials = login_disabled, credentials
        self.option = option


def command_table(*commands):
    return {command.verb: command for command in commands}


class ProtocolName:
    """One -P value: its protocol class, default port, whether TLS starts
    at once (then ssl_mode defaults to ssl_all) and the program-name
    suffixes that choose it (perdition.imaps ...)."""

    def __init__(self, name, port, ssl, programs):
        self.name, self.port, self.ssl = name, port, ssl
        self.programs = programs
        self.protocol_class = None


PROTOCOLS = {}          # -P value -> ProtocolName, in registration order


def register(cls):
    """Add a protocol class and its names to the registry that --help, the
    option defaults, the man page and the sample configuration read."""
    for entry in cls.names:
        entry.protocol_class = cls
        PROTOCOLS[entry.name] = entry
    cls.credential_verbs = tuple(sorted(
        (c.verb for c in cls.commands.values() if c.credentials),
        key=len, reverse=True))         # AUTHENTICATE before AUTH
    capability = OPTIONS_BY_NAME["capability"]
    capability.aliases += (cls.capability_alias,)
    OPTIONS_BY_NAME[cls.capability_alias] = capability
    return cls


def protocol_classes():
    """The registered protocol classes, each once, in order."""
    return list(dict.fromkeys(e.protocol_class for e in PROTOCOLS.values()))


def what_perdition_is():
    """'POP3, IMAP4 and ManageSieve proxy server', from the registry."""
    return "%s proxy server" % or_list((cls.title for cls in
                                        protocol_classes()), "and")


def protocol_for_program(suffix):
    """The -P value a program name such as perdition.imap4s chooses."""
    return next((entry.name for entry in PROTOCOLS.values()
                 if suffix.lower() in entry.programs), "POP3")


class Protocol:
    """What every protocol shares: the command loop before login, which
    applies every gate in one place, and the rule that keeps passwords out
    of the dialogue log.  A protocol class declares its names, defaults and
    `commands` table, parses a command line into (verb, arguments), and
    supplies the parts of the back-end login the session drives:
    server_greeting, server_capabilities (where a greeting may have none),
    server_start_tls, server_forward, server_login.
    """

    title = ""                  # as the manual names the protocol
    names = ()                  # ProtocolName rows, for the registry
    map_name = ""               # the protocol as the popmap is told it
    default_capability = ""
    managed_capabilities = ()   # the words perdition adds and removes
    capability_separator = " "
    separator_name = "a space"  # for the help text
    capability_alias = ""       # another name of -I, e.g. imap_capability
    start_tls_command = ""
    server_ok = ""              # how a real server's yes starts (XCLIENT)
    commands = {}
    credential_verbs = ()       # made by register() from `commands`
    verb_word = 0               # which word of a command line is the verb
    __slots__ = ("session", "config")

    def __init__(self, session):
        self.session = session
        self.config = session.config

    def serve(self):
        """The command loop before login: read a command, look it up, apply
        every gate, dispatch.  Returns the Credentials to try, or None when
        the client leaves."""
        session = self.session
        while True:
            line = session.read_client_bytes()
            session.log_dialogue("client", line)
            request = self.request(line)
            try:
                verb, arguments = self.parse(request)
                command = self.commands.get(verb)
                self.check(verb, command)
                outcome = getattr(self, command.handler)(arguments)
            except BadCommand as e:
                self.refuse(request, e)
                continue
            if outcome is QUIT:
                return None
            if outcome is not None:
                return outcome

    def check(self, verb, command):
        """The gates: an unknown command, one not allowed with or without
        TLS, a login while logging in is not allowed."""
        if command is None or not self.offered(command):
            raise BadCommand("Unknown command, expected %s"
                             % or_list(c.verb for c in self.commands.values()
                                       if self.offered(c) and self.allowed(c)))
        if not self.in_tls_state(command):
            raise BadCommand("%s not available" % verb)
        if not command.login_disabled:
            refusal = self.session.login_refusal()
            if refusal:
                raise BadCommand(refusal)

    def offered(self, command):
        return command.option is None or getattr(self.config, command.option)

    def in_tls_state(self, command):
        return command.before_tls if self.session.tls_offered() \
            else command.after_tls

    def allowed(self, command):
        return self.in_tls_state(command) and (
            command.login_disabled or not self.session.login_refusal())

    def refuse(self, request, error):
        """Answer a refused command, which counts towards --max_errors."""
        self.discard(request)
        self.session.reply(self.error(str(error)))
        self.session.count_error()

    def discard(self, request):
        """Read and drop what is left of a refused command."""

    def redact(self, line, continuation=False):
        """The one rule for secrets in the dialogue log, in both directions
        and on both sides: a line that continues an authentication exchange
        is masked whole; a command whose verb carries credentials (the
        command table says which) keeps only what comes up to its verb.
        Words are split at any white space, and a verb is matched in any
        case at the start of any of the first words, so that a malformed
        line (doubled spaces, a tab, a missing tag, a verb glued to what
        follows it) hides its password too."""
        if continuation:
            return "+ XXXXXX" if line.startswith("+") else "XXXXXX"
        words = line.split(None, self.verb_word + 1)
        for n, word in enumerate(words[:self.verb_word + 1]):
            for verb in self.credential_verbs:
                head = word[:len(verb)]
                if head.isascii() and head.upper() == verb:
                    hidden = len(word) > len(verb) or len(words) > n + 1
                    return " ".join(words[:n] + [head] + ["XXXXXX"] * hidden)
        return line

    def capabilities(self):
        """The capability option, less the words perdition adds and removes
        itself (managed_capabilities), plus those of them that stand now
        (added_capabilities says which)."""
        stands = self.added_capabilities()
        names = {c.split()[0] for c in self.managed_capabilities}
        words = [c for c in self.config.capability.split(
            self.capability_separator)
            if c.strip() and c.split()[0].upper() not in names]
        return words + [c for c in self.managed_capabilities if stands[c]]

    def own_greeting(self, hostname):
        """The line by which perdition knows itself behind a real server."""
        return self.greeting(hostname)

    def server_after_tls(self, server):
        """What the real server says unasked once TLS is up: capabilities,
        or None."""
        return None

    def plain_login_allowed(self):
        """LOGIN, USER/PASS and SASL PLAIN are offered exactly when this
        is true: not under --login_disabled, nor before TLS with
        tls_listen_force."""
        return not self.session.login_refusal()

    # -- SASL PLAIN (RFC 4616), the same for every protocol ------------------

    def sasl_plain(self, response):
        """The credentials of a SASL PLAIN exchange.  `response` is the
        initial response ('=' for an empty one), or None: then the client
        is asked for it with a continuation, and '*' cancels."""
        if response is None:
            response = self.read_sasl_response()
        elif response == b"=":
            response = b""
        try:
            message = binascii.a2b_base64(response, strict_mode=True)
        except binascii.Error:
            raise BadCommand("Invalid base64 in SASL response") from None
        parts = message.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise BadCommand("Invalid SASL PLAIN message")
        authzid, user, password = (part.decode("utf-8", "surrogateescape")
                                   for part in parts)
        return Credentials(user, password, "" if authzid == user else authzid)

    def read_sasl_response(self):
        """Ask for the SASL response with an empty challenge and read it:
        a line of base64, '*' to cancel."""
        session = self.session
        session.reply(self.sasl_continuation, continuation=True)
        response = session.read_client_bytes()
        session.log_dialogue("client", response, True)
        if response == b"*":
            raise BadCommand("Authentication cancelled")
        return response

    @staticmethod
    def sasl_plain_response(backend, credentials):
        """The base64 PLAIN message for the real server: the authorisation
        identity, if any, the user and password the back-end has."""
        message = "\0".join((credentials.authzid, backend.user,
                             backend.password))
        return binascii.b2a_base64(message.encode(
            "utf-8", "surrogateescape"), newline=False) or b"="

    def no_authorisation_identity(self):
        return LoginFailure("The real server does not offer SASL PLAIN, "
                            "which could carry the authorisation identity",
                            "Authorisation identity not supported")

    # -- Dovecot's XCLIENT, which POP3 and ManageSieve share -----------------

    def take_xclient(self, words):
        """XCLIENT from a proxy in front: only its TTL is taken, which can
        only shorten the way (the address stays the one perdition sees: no
        client is trusted to name another)."""
        for word in words:
            name, _, value = word.partition("=")
            if name.upper() == "TTL" and value.isascii() and value.isdigit():
                self.session.note_proxy_ttl(int(value))

    def send_xclient(self, server, forwarded):
        """--forward_client_address towards a server that offers XCLIENT:
        the client's address, port, session and hops left, as Dovecot
        takes them from its login_trusted_networks.  A refusal is logged;
        the login goes on."""
        words = ["%s=%s" % (XCLIENT_FIELDS[name], value)
                 for name, value in forwarded.fields()
                 if name in XCLIENT_FIELDS]
        if any(has_controls(w) or " " in w for w in words):
            raise LoginFailure("Unquotable forwarded address")
        session = self.session
        session.send_server(server, "XCLIENT " + " ".join(words))
        answer = session.read_server_line(server)
        if not answer.startswith(self.server_ok):
            log.info("%s: XCLIENT refused by the real server: %s"
                     % (session.client_name, log_text(answer)))


XCLIENT_FIELDS = {"originating-ip": "ADDR", "originating-port": "PORT",
                  "session-id": "SESSION", "proxy-ttl": "TTL"}


@register
class POP3(Protocol):
    """RFC 1939 (with RFC 2449 CAPA and RFC 2595 STLS) up to the login."""

    title = "POP3"
    server_ok = "+OK"
    names = (ProtocolName("POP3", 110, False, ("pop3",)),
             ProtocolName("POP3S", 995, True, ("pop3s",)))
    map_name = "pop3"
    default_capability = "UIDL  USER"
    managed_capabilities = ("STLS", "SASL PLAIN", "XCLIENT")
    capability_separator = "  "
    separator_name = "two spaces"
    capability_alias = "pop_capability"
    start_tls_command = "STLS"
    sasl_continuation = "+ "
    commands = command_table(
        Command("USER", "do_user", login_disabled=False),
        Command("PASS", "do_pass", login_disabled=False, credentials=True),
        Command("AUTH", "do_auth", login_disabled=False, credentials=True),
        Command("CAPA", "do_capa"),
        Command("XCLIENT", "do_xclient", option="forward_client_address"),
        Command("NOOP", "do_noop"),
        Command("STLS", "do_stls", after_tls=False),
        Command("QUIT", "do_quit"))
    __slots__ = ("user", "server_xclient")

    def __init__(self, session):
        super().__init__(session)
        self.user = None
        self.server_xclient = False

    # -- towards the client ------------------------------------------------

    @staticmethod
    def greeting(hostname):
        return "+OK POP3 Ready %s" % hostname

    def added_capabilities(self):
        return {"STLS": self.session.tls_offered(),
                "SASL PLAIN": self.plain_login_allowed(),
                "XCLIENT": self.config.forward_client_address}

    def request(self, line):
        return line.decode("utf-8", "surrogateescape")

    def parse(self, line):
        if "\0" in line:
            raise BadCommand("Invalid character in command")
        verb, _, argument = line.partition(" ")
        return verb.upper(), argument

    def error(self, text):
        return "-ERR %s" % text

    def do_user(self, argument):
        if not argument:
            raise BadCommand("USER needs an argument")
        self.user = argument
        self.session.reply("+OK USER %s set" % log_text(argument))

    def do_pass(self, argument):
        if not argument:
            raise BadCommand("PASS needs an argument")
        if self.user is None:
            raise BadCommand("USER must come before PASS")
        return Credentials(self.user, argument)

    def do_auth(self, argument):
        """RFC 5034; AUTH alone lists the mechanisms, as Dovecot does."""
        words = argument.split()
        if not words:
            self.session.reply("+OK\r\nPLAIN\r\n.")
        elif words[0].upper() != "PLAIN":
            self.session.reply("-ERR Unsupported authentication mechanism")
        elif len(words) > 2:
            raise BadCommand("Too many arguments")
        else:
            return self.sasl_plain(words[1].encode("utf-8", "surrogateescape")
                                   if len(words) == 2 else None)

    def do_xclient(self, argument):
        self.take_xclient(argument.split())
        self.session.reply("+OK")

    def do_capa(self, argument):
        self.session.reply("+OK Capability list follows\r\n" + "".join(
            c + "\r\n" for c in self.capabilities()) + ".")

    def do_noop(self, argument):
        self.session.reply("+OK")

    def do_stls(self, argument):
        self.session.reply("+OK Begin TLS negotiation")
        self.session.start_tls_listen()
        self.user = None

    def do_quit(self, argument):
        self.session.reply("+OK Bye")
        return QUIT

    def ok(self, server_line):
        if self.config.server_resp_line:
            return server_line
        return "+OK %s" % self.config.ok_line

    def failure(self, text):
        return "-ERR %s" % text

    @staticmethod
    def farewell(text):
        return "-ERR %s" % text

    # -- towards the real server -------------------------------------------

    def expect_ok(self, server, what):
        line = self.session.read_server_line(server)
        if not line.startswith("+OK"):
            raise LoginFailure("%s: %s" % (what, line))
        return line

    def command(self, server, text):
        self.session.send_server(server, text)
        return self.expect_ok(server, text.split(" ")[0])

    def server_greeting(self, server):
        """Read the greeting; POP3 greets without capabilities (None), but
        Dovecot's says [XCLIENT] to the proxies it trusts."""
        greeting = self.expect_ok(server, "Greeting")
        self.session.check_greeting(greeting)
        self.server_xclient = greeting.startswith("+OK [XCLIENT]")
        return None

    def server_capabilities(self, server):
        """CAPA's words; the mechanisms of its SASL line as AUTH=<name>,
        as IMAP names them."""
        session = self.session
        session.send_server(server, "CAPA")
        if not session.read_server_line(server).startswith("+OK"):
            return frozenset()
        words = set()
        for line in session.read_server_lines(server):
            name, *arguments = line.upper().split() or [""]
            words.add(name)
            if name == "SASL":
                words.update("AUTH=" + word for word in arguments)
        return frozenset(words)

    def server_start_tls(self, server):
        self.command(server, "STLS")
        self.server_xclient = False     # said before TLS: forgotten

    def server_forward(self, server, capabilities, forwarded):
        """--forward_client_address: Dovecot's XCLIENT, where the greeting
        offers it (as Dovecot's does to its login_trusted_networks) or CAPA
        lists it."""
        if not self.server_xclient and capabilities is None:
            capabilities = self.server_capabilities(server)
        if self.server_xclient or "XCLIENT" in capabilities:
            self.send_xclient(server, forwarded)
        return capabilities

    def server_login(self, server, capabilities, backend, credentials):
        """USER/PASS as the C perdition does; AUTH PLAIN where the server
        takes no USER but PLAIN (a CAPA without USER, or USER refused), or
        an authorisation identity must be carried.  Returns the server's
        final +OK line."""
        if credentials.authzid or (capabilities is not None and
                                   "USER" not in capabilities):
            if capabilities is None:
                capabilities = self.server_capabilities(server)
            if "AUTH=PLAIN" in capabilities:
                return self.server_auth_plain(server, backend, credentials)
            if credentials.authzid:
                raise self.no_authorisation_identity()
        if has_controls(backend.user) or has_controls(backend.password):
            raise LoginFailure("Control character in user name or password",
                               "Invalid user name or password")
        self.session.send_server(server, "USER %s" % backend.user)
        answer = self.session.read_server_line(server)
        if not answer.startswith("+OK"):
            if capabilities is None:
                capabilities = self.server_capabilities(server)
            if "USER" in capabilities or "AUTH=PLAIN" not in capabilities:
                raise LoginFailure("USER: %s" % answer)
            return self.server_auth_plain(server, backend, credentials)
        return self.command(server, "PASS %s" % backend.password)

    def server_auth_plain(self, server, backend, credentials):
        """RFC 5034: the initial response on the AUTH line, unless that
        would make it longer than 255 octets."""
        session = self.session
        response = self.sasl_plain_response(backend, credentials)
        if len(response) <= 255 - len("AUTH PLAIN \r\n"):
            session.send_server(server, b"AUTH PLAIN " + response)
        else:
            session.send_server(server, "AUTH PLAIN")
            answer = session.read_server_line(server, True)
            if not answer.startswith("+"):
                raise LoginFailure("AUTH: %s" % answer)
            session.send_server(server, response, True)
        answer = session.read_server_line(server)
        if not answer.startswith("+OK"):
            raise LoginFailure("AUTH: %s" % answer)
        return answer


# RFC 3501 tag: ASTRING-CHAR but '+', i.e. no CTL, SP, ( ) { % * " \ ] +
IMAP_TAG_RE = re.compile(
    rb'[\x21\x23\x24\x26\x27\x2c-\x5b\x5e-\x7a\x7c-\x7e]+\Z')
# An unquoted argument, as Dovecot and the C perdition accept it: anything
# but CTL, SP and ( ) { " \ -- so '%', '*' and ']' too.
IMAP_ASTRING_RE = re.compile(rb'[^\x00-\x20(){"\\\x7f]+')
IMAP_LITERAL_RE = re.compile(rb'\{(\d{1,10})(\+?)\}\Z')
IMAP_QUOTABLE_RE = re.compile(rb'[\x20-\x7e]*\Z')
ID_MAX_PAIRS, ID_MAX_KEY, ID_MAX_VALUE = 30, 30, 1024  # RFC 2971 section 3.3


def imap_quoted(word):
    """A quotable word (IMAP_QUOTABLE_RE) as an IMAP quoted string."""
    return b'"' + word.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class IMAPReader:
    """The IMAP string grammar over one command from the client: atoms,
    quoted strings, synchronising and non-synchronising (RFC 2088) literals,
    read in order as the arguments are asked for.  IMAP and ManageSieve
    share it.  `line` is the line read last, `rest` its part not yet parsed;
    a literal is read with the line that follows it.  A whole command,
    literals and all, is at most MAX_COMMAND bytes."""

    __slots__ = ("session", "line", "rest", "size", "prompt")

    def __init__(self, session, line, prompt="+ Ready for argument"):
        self.session = session
        self.line = self.rest = line
        self.size = len(line)
        # The go-ahead for a synchronising literal; None where there is
        # none (ManageSieve): then the client sends every literal at once.
        self.prompt = prompt

    def at_end(self):
        return not self.rest

    def end(self):
        if self.rest:
            raise BadCommand("Too many arguments")

    def space(self):
        if not self.rest.startswith(b" "):
            raise BadCommand("Missing argument")
        self.rest = self.rest[1:]

    def atom(self, pattern=IMAP_ASTRING_RE):
        match = pattern.match(self.rest)
        if not match:
            raise BadCommand("Invalid argument")
        self.rest = self.rest[match.end():]
        return match.group()

    def astring(self):
        """An atom, a quoted string or a literal, after its space."""
        self.space()
        if self.rest.startswith(b'"') or IMAP_LITERAL_RE.match(self.rest):
            return self.string()
        return self.atom()

    def nil(self):
        """True, past it, if NIL comes next."""
        if self.rest[:3].upper() == b"NIL" and \
                self.rest[3:4] in (b"", b" ", b")"):
            self.rest = self.rest[3:]
            return True
        return False

    def open_list(self):
        if not self.rest.startswith(b"("):
            raise BadCommand("Invalid argument")
        self.rest = self.rest[1:]

    def close_list(self):
        """True, past it, if a ')' comes next."""
        if self.rest.startswith(b")"):
            self.rest = self.rest[1:]
            return True
        return False

    def string(self):
        """A quoted string or a literal."""
        if self.rest.startswith(b'"'):
            return self.quoted()
        if IMAP_LITERAL_RE.match(self.rest):
            return self.literal()
        raise BadCommand("Invalid argument")

    def quoted(self):
        rest, value, i = self.rest, bytearray(), 1
        while i < len(rest):
            c = rest[i]
            if c == 0x22:
                self.rest = rest[i + 1:]
                return bytes(value)
            if c == 0x5c:
                i += 1
                if i >= len(rest) or rest[i] not in b'"\\':
                    raise BadCommand("Invalid escape in quoted string")
                c = rest[i]
            value.append(c)
            i += 1
        raise BadCommand("Unterminated quoted string")

    def literal(self):
        match = IMAP_LITERAL_RE.match(self.rest)
        size = int(match.group(1))
        synchronising = not match.group(2) and self.prompt is not None
        if size > MAX_LITERAL:
            if synchronising:
                raise BadCommand("Literal too long")
            raise ProtocolError("Literal too long")
        if synchronising:
            self.session.reply(self.prompt)
        value = self.session.client.read_exact(size)
        self.next_line(size)
        if b"\0" in value:      # RFC 3501: no NUL in a literal
            raise BadCommand("Invalid character in literal")
        return value

    def next_line(self, literal_size):
        self.size += literal_size
        if self.size > MAX_COMMAND:
            raise ProtocolError("Command too long")
        self.line = self.rest = self.session.read_client_bytes()
        self.size += len(self.line)

    def skip(self):
        """Drop the rest of a refused command: each non-synchronising
        literal it still announces and the line after it, in a loop bounded
        by MAX_COMMAND.  (A synchronising one the client sends only when
        told to.)"""
        while True:
            match = IMAP_LITERAL_RE.search(self.line)
            if not match or not match.group(2) and self.prompt is not None:
                return
            size = int(match.group(1))
            if size > MAX_LITERAL:
                raise ProtocolError("Literal too long")
            self.session.client.read_exact(size)
            self.next_line(size)


@register
class IMAP4(Protocol):
    """RFC 3501 (with RFC 2088 LITERAL+ and RFC 2595 STARTTLS) up to LOGIN.

    Tags are checked against RFC 3501's grammar before anything is echoed:
    a bad tag gets an untagged BAD.
    """

    title = "IMAP4"
    names = (ProtocolName("IMAP4", 143, False, ("imap4",)),
             ProtocolName("IMAP4S", 993, True, ("imap4s", "imaps")))
    map_name = "imap"
    default_capability = "IMAP4 IMAP4REV1"
    managed_capabilities = ("ID", "STARTTLS", "LOGINDISABLED", "AUTH=PLAIN",
                            "SASL-IR")
    capability_alias = "imap_capability"
    start_tls_command = "STARTTLS"
    sasl_continuation = "+ "
    commands = command_table(
        Command("CAPABILITY", "do_capability"),
        Command("NOOP", "do_noop"),
        Command("LOGIN", "do_login", login_disabled=False, credentials=True),
        Command("AUTHENTICATE", "do_authenticate", login_disabled=False,
                credentials=True),
        Command("ID", "do_id"),
        Command("STARTTLS", "do_starttls", after_tls=False),
        Command("LOGOUT", "do_logout"))
    verb_word = 1
    __slots__ = ("tag", "server_tag")

    def __init__(self, session):
        super().__init__(session)
        self.tag = b"*"
        self.server_tag = 0

    # -- towards the client ------------------------------------------------

    @staticmethod
    def greeting(hostname):
        return "* OK IMAP4 Ready %s" % hostname

    def added_capabilities(self):
        session = self.session
        plain = self.plain_login_allowed()
        return {"ID": True, "STARTTLS": session.tls_offered(),
                "LOGINDISABLED": not plain, "AUTH=PLAIN": plain,
                "SASL-IR": plain}

    def tagged(self, text):
        return self.tag.decode("ascii") + " " + text

    def request(self, line):
        return IMAPReader(self.session, line)

    def parse(self, reader):
        self.tag = b"*"
        tag, _, rest = reader.line.partition(b" ")
        if not IMAP_TAG_RE.match(tag):
            raise BadCommand("Invalid tag" if tag else "Null command")
        self.tag = tag
        if b"\0" in reader.line:
            raise BadCommand("Invalid character in command")
        verb = rest.partition(b" ")[0]
        reader.rest = rest[len(verb):]
        return verb.upper().decode("latin-1"), reader

    def discard(self, reader):
        reader.skip()

    def error(self, text):
        return self.tagged("BAD %s" % text)

    def do_capability(self, arguments):
        arguments.end()
        self.session.reply("* CAPABILITY " + " ".join(self.capabilities())
                           + "\r\n" + self.tagged("OK CAPABILITY completed"))

    def do_noop(self, arguments):
        arguments.end()
        self.session.reply(self.tagged("OK NOOP completed"))

    def do_logout(self, arguments):
        arguments.end()
        self.session.reply("* BYE IMAP4 Ready logging out\r\n"
                           + self.tagged("OK LOGOUT completed"))
        return QUIT

    def do_starttls(self, arguments):
        arguments.end()
        self.session.reply(self.tagged("OK Begin TLS negotiation now"))
        self.session.start_tls_listen()

    def do_authenticate(self, arguments):
        """SASL PLAIN, with the initial response (RFC 4959) or without."""
        arguments.space()
        mechanism = arguments.atom()
        if mechanism.upper() != b"PLAIN":
            arguments.skip()
            self.session.reply(self.tagged("NO Unsupported authentication "
                                           "mechanism"))
            return None
        response = None
        if not arguments.at_end():
            arguments.space()
            response = arguments.atom()
        arguments.end()
        return self.sasl_plain(response)

    def do_id(self, arguments):
        """RFC 2971: the client's list (or NIL) is read, bounded, and
        perdition says who it is."""
        arguments.space()
        if arguments.nil():
            arguments.end()
        else:
            arguments.open_list()
            pairs = 0
            while not arguments.close_list():
                if pairs:
                    arguments.space()
                key = arguments.string()
                arguments.space()
                value = None if arguments.nil() else arguments.string()
                if key.lower() == b"x-proxy-ttl" and value is not None and \
                        value.isascii() and value.isdigit():
                    self.session.note_proxy_ttl(int(value))
                pairs += 1
                if pairs > ID_MAX_PAIRS or len(key) > ID_MAX_KEY or \
                        value is not None and len(value) > ID_MAX_VALUE:
                    raise BadCommand("ID: at most %d pairs, keys of %d "
                                     "bytes, values of %d" % (
                                         ID_MAX_PAIRS, ID_MAX_KEY,
                                         ID_MAX_VALUE))
            arguments.end()
        self.session.reply('* ID ("name" "perdition")\r\n'
                           + self.tagged("OK ID completed"))

    def do_login(self, arguments):
        user = arguments.astring()
        password = arguments.astring()
        arguments.end()
        return Credentials(*(value.decode("utf-8", "surrogateescape")
                             for value in (user, password)))

    def ok(self, server_line):
        if self.config.server_resp_line:
            return self.tagged(server_line)
        return self.tagged("OK %s" % self.config.ok_line)

    def failure(self, text):
        return self.tagged("NO %s" % text)

    @staticmethod
    def farewell(text):
        return "* BYE %s" % text

    # -- towards the real server -------------------------------------------

    def server_command(self, server, words, untagged=None, response=None):
        """Send a command, quoting each argument (str) or sending it as a
        literal (so a CR or LF inside can never end the command), and
        return the tagged response line; untagged lines go to `untagged`.
        A SASL `response` is sent on a line of its own when the server asks
        for it; any other continuation is a failure (PLAIN has one step)."""
        session = self.session
        self.server_tag += 1
        tag = "P%d" % self.server_tag
        verb = words[0].decode()
        line, continuation = tag.encode(), False
        for word in words:
            if isinstance(word, str):
                word = word.encode("utf-8", "surrogateescape")
                if IMAP_QUOTABLE_RE.match(word):
                    line += b" " + imap_quoted(word)
                    continue
                self.go_ahead(server, verb, line + b" {%d}" % len(word),
                              continuation)
                line, continuation = word, True
            else:
                line += b" " + word
        if response is not None:
            self.go_ahead(server, verb, line, continuation)
            line, continuation = response, True
        session.send_server(server, line, continuation)
        for answer in session.server_lines(server):
            if answer.startswith(tag + " "):
                return answer[len(tag) + 1:]
            if answer.startswith("+"):
                raise LoginFailure("%s: an unexpected continuation" % verb)
            if untagged is not None:
                untagged.append(answer)

    def go_ahead(self, server, verb, line, continuation):
        """Send `line`, then wait for the '+' after which the rest of the
        command may follow."""
        session = self.session
        session.send_server(server, line, continuation)
        answer = session.read_server_line(server, True)
        if not answer.startswith("+"):
            raise LoginFailure("%s: %s" % (verb, answer))

    def server_greeting(self, server):
        """Read the greeting; its capabilities, or None if it has none."""
        session = self.session
        greeting = session.read_server_line(server)
        if not greeting.startswith("* OK"):
            raise LoginFailure("Greeting: %s" % greeting)
        session.check_greeting(greeting)
        match = re.match(r"\* OK \[CAPABILITY ([^\]]*)\]", greeting)
        return frozenset(match.group(1).upper().split()) if match else None

    def server_capabilities(self, server):
        lines = []
        self.server_command(server, [b"CAPABILITY"], lines)
        return frozenset(word for line in lines
                         if line.upper().startswith("* CAPABILITY ")
                         for word in line[13:].upper().split())

    def server_start_tls(self, server):
        answer = self.server_command(server, [b"STARTTLS"])
        if not answer.startswith("OK"):
            raise LoginFailure("STARTTLS: %s" % answer)

    def server_forward(self, server, capabilities, forwarded):
        """--forward_client_address: ID with the client's address, the
        fields Dovecot takes from its login_trusted_networks, where the
        server offers ID; the values quoted as LOGIN's are."""
        if capabilities is None:
            capabilities = self.server_capabilities(server)
        if "ID" in capabilities:
            fields = [(b"x-" + name.encode(), value.encode())
                      for name, value in forwarded.fields()]
            if not all(IMAP_QUOTABLE_RE.match(v) for _, v in fields):
                raise LoginFailure("Unquotable forwarded address")
            answer = self.server_command(server, [b"ID", b"(" + b" ".join(
                imap_quoted(word) for pair in fields for word in pair)
                + b")"])
            if not answer.startswith("OK"):
                log.info("%s: ID refused by the real server: %s"
                         % (self.session.client_name, log_text(answer)))
        return capabilities

    def server_login(self, server, capabilities, backend, credentials):
        """LOGIN as the C perdition does; AUTHENTICATE PLAIN where the
        server says LOGINDISABLED (RFC 3501: then no LOGIN) but offers
        PLAIN, or an authorisation identity must be carried."""
        if capabilities is None:
            capabilities = self.server_capabilities(server)
        if credentials.authzid or "LOGINDISABLED" in capabilities:
            if "AUTH=PLAIN" in capabilities:
                return self.server_authenticate_plain(
                    server, capabilities, backend, credentials)
            if credentials.authzid:
                raise self.no_authorisation_identity()
            raise LoginFailure("Server has LOGINDISABLED")
        answer = self.server_command(
            server, [b"LOGIN", backend.user, backend.password])
        if not answer.startswith("OK"):
            raise LoginFailure("LOGIN: %s" % answer)
        return answer

    def server_authenticate_plain(self, server, capabilities, backend,
                                  credentials):
        """With the initial response where the server has SASL-IR."""
        response = self.sasl_plain_response(backend, credentials)
        words = [b"AUTHENTICATE", b"PLAIN"]
        if "SASL-IR" in capabilities:
            answer = self.server_command(server, words + [response])
        else:
            answer = self.server_command(server, words, response=response)
        if not answer.startswith("OK"):
            raise LoginFailure("AUTHENTICATE: %s" % answer)
        return answer


def sieve_string(text):
    """A ManageSieve quoted string (RFC 5804 section 4)."""
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


SIEVE_CAPABILITY_RE = re.compile(r'"([^"]*)"(?: +"([^"]*)")?')


@register
class ManageSieve(Protocol):
    """RFC 5804 up to AUTHENTICATE, as the C perdition 2.2 proxies it.

    The greeting is the capability response; commands have no tags; every
    refusal is NO.  Strings are the IMAP grammar's (IMAPReader), with
    non-synchronising literals only, as RFC 5804 has them from clients.
    """

    title = "ManageSieve"
    server_ok = "OK"
    names = (ProtocolName("MANAGESIEVE", 4190, False, ("managesieve",)),)
    map_name = "managesieve"
    default_capability = (
        '"IMPLEMENTATION" "perdition"  "SIEVE" "fileinto reject envelope '
        'encoded-character vacation subaddress comparator-i;ascii-numeric '
        'relational regex imap4flags copy include variables body enotify '
        'environment mailbox date"  "NOTIFY" "mailto"  "VERSION" "1.0"')
    managed_capabilities = ('"SASL" "PLAIN"', '"SASL" ""', '"STARTTLS"',
                            '"XCLIENT"')
    capability_separator = "  "
    separator_name = "two spaces"
    capability_alias = "managesieve_capability"
    start_tls_command = "STARTTLS"
    commands = command_table(
        Command("AUTHENTICATE", "do_authenticate", login_disabled=False,
                credentials=True),
        Command("CAPABILITY", "do_capability"),
        Command("NOOP", "do_noop"),
        Command("STARTTLS", "do_starttls", after_tls=False),
        Command("XCLIENT", "do_xclient", option="forward_client_address"),
        Command("LOGOUT", "do_logout"))
    __slots__ = ()

    # -- towards the client ------------------------------------------------

    def greeting(self, hostname):
        return self.capability_response() + "\r\n" + \
            self.own_greeting(hostname)

    @staticmethod
    def own_greeting(hostname):
        return 'OK "ManageSieve Ready %s"' % hostname

    def capability_response(self):
        return "\r\n".join(self.capabilities())

    def added_capabilities(self):
        """SASL is always listed (RFC 5804 section 1.7), empty where no
        login is allowed now."""
        plain = self.plain_login_allowed()
        return {'"SASL" "PLAIN"': plain, '"SASL" ""': not plain,
                '"STARTTLS"': self.session.tls_offered(),
                '"XCLIENT"': self.config.forward_client_address}

    def request(self, line):
        return IMAPReader(self.session, line, prompt=None)

    def parse(self, reader):
        if b"\0" in reader.line:
            raise BadCommand("Invalid character in command")
        verb = reader.line.partition(b" ")[0]
        reader.rest = reader.line[len(verb):]
        return verb.upper().decode("latin-1"), reader

    def discard(self, reader):
        reader.skip()

    def error(self, text):
        return "NO %s" % sieve_string(text)

    def do_capability(self, arguments):
        arguments.end()
        self.session.reply(self.capability_response() +
                           '\r\nOK "Capability completed."')

    def do_noop(self, arguments):
        """NOOP with a tag echoes it (RFC 5804 section 2.13)."""
        tag = None
        if not arguments.at_end():
            arguments.space()
            tag = arguments.string()
            if not IMAP_QUOTABLE_RE.match(tag):
                raise BadCommand("Invalid tag")
        arguments.end()
        self.session.reply('OK (TAG %s) "Done"' % sieve_string(tag.decode())
                           if tag is not None else 'OK "Done"')

    def do_logout(self, arguments):
        arguments.end()
        self.session.reply('OK "Logout completed."')
        return QUIT

    def do_starttls(self, arguments):
        """After the handshake the capabilities again (RFC 5804 2.2)."""
        arguments.end()
        self.session.reply('OK "Begin TLS negotiation now."')
        self.session.start_tls_listen()
        self.session.reply(self.capability_response() +
                           '\r\nOK "TLS negotiation successful."')

    def do_xclient(self, arguments):
        words = []
        while not arguments.at_end():
            arguments.space()
            words.append(arguments.atom().decode("latin-1"))
        self.take_xclient(words)
        self.session.reply('OK "Updated"')

    def do_authenticate(self, arguments):
        """AUTHENTICATE "PLAIN", the initial response a string if any."""
        arguments.space()
        mechanism = arguments.string()
        if mechanism.upper() != b"PLAIN":
            arguments.skip()
            self.session.reply('NO "Unsupported authentication mechanism"')
            return None
        response = None
        if not arguments.at_end():
            arguments.space()
            response = arguments.string() or b"="
        arguments.end()
        return self.sasl_plain(response)

    def read_sasl_response(self):
        """The challenge is an empty string; the answer a string, "*" to
        cancel."""
        session = self.session
        session.reply('""', continuation=True)
        line = session.read_client_bytes()
        session.log_dialogue("client", line, True)
        reader = IMAPReader(session, line, prompt=None)
        response = reader.string()
        reader.end()
        if response == b"*":
            raise BadCommand("Authentication cancelled")
        return response

    def ok(self, server_line):
        if self.config.server_resp_line:
            return server_line
        return "OK %s" % sieve_string(self.config.ok_line)

    def failure(self, text):
        return "NO %s" % sieve_string(text)

    @staticmethod
    def farewell(text):
        return "BYE %s" % sieve_string(text)

    # -- towards the real server -------------------------------------------

    def read_capabilities(self, server):
        """A capability response up to its OK: (words, the OK line).  The
        mechanisms of "SASL" become AUTH=<name>, as IMAP names them."""
        words = set()
        for line in self.session.server_lines(server):
            if line.startswith(("OK", "NO", "BYE")):
                if not line.startswith("OK"):
                    raise LoginFailure("Capabilities: %s" % line)
                return frozenset(words), line
            match = SIEVE_CAPABILITY_RE.match(line)
            if match:
                name = match.group(1).upper()
                words.add(name)
                if name == "SASL":
                    words.update("AUTH=" + word for word in
                                 (match.group(2) or "").upper().split())

    def server_greeting(self, server):
        capabilities, line = self.read_capabilities(server)
        self.session.check_greeting(line)
        return capabilities

    def server_start_tls(self, server):
        self.session.send_server(server, "STARTTLS")
        answer = self.session.read_server_line(server)
        if not answer.startswith("OK"):
            raise LoginFailure("STARTTLS: %s" % answer)

    def server_after_tls(self, server):
        """RFC 5804 section 2.2: the server says its capabilities again
        inside TLS; those said before are forgotten."""
        return self.read_capabilities(server)[0]

    def server_forward(self, server, capabilities, forwarded):
        """--forward_client_address: Dovecot's XCLIENT, which its
        capabilities list to the proxies it trusts."""
        if "XCLIENT" in capabilities:
            self.send_xclient(server, forwarded)
        return capabilities

    def server_login(self, server, capabilities, backend, credentials):
        """The greeting always has the capabilities."""
        if "AUTH=PLAIN" not in capabilities:
            raise LoginFailure("Server does not offer SASL PLAIN")
        session = self.session
        session.send_server(server, b'AUTHENTICATE "PLAIN" "%s"' %
                            self.sasl_plain_response(backend, credentials))
        answer = session.read_server_line(server)
        if not answer.startswith("OK"):
            raise LoginFailure("AUTHENTICATE: %s" % answer)
        return answer


# ---------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------

def plain_address(address):
    """An IPv4-mapped IPv6 address is logged and matched as IPv4."""
    host = address[0]
    return (host[7:] if host.startswith("::ffff:") and "." in host
            else host), address[1]


class Forwarded(collections.namedtuple("Forwarded", (
        "client_ip", "client_port", "server_ip", "server_port", "session_id",
        "ttl"))):
    """What --forward_client_address tells the real server."""

    def fields(self):
        """(name, value) in the words of Dovecot's ID fields, less x-."""
        return [("originating-ip", self.client_ip),
                ("originating-port", str(self.client_port)),
                ("connected-ip", self.server_ip),
                ("connected-port", str(self.server_port)),
                ("session-id", self.session_id),
                ("proxy-ttl", str(self.ttl))]


class Deadline:
    """One entry of Deadlines: `function(*args)` at its time, unless
    cancelled; `ran` once it has been called."""

    __slots__ = ("function", "args", "ran")

    def __init__(self, function, args):
        self.function, self.args = function, args
        self.ran = False


class Deadlines:
    """Calls functions at their time, from one thread for all sessions
    (--login_timeout), so that a deadline costs no thread of its own.

    A function runs holding the lock, as cancel() does, so the two never
    cross: cancel() tells whether the function has run.  A cancelled entry
    drops its function at once, and with it the session it names; the
    heap itself is rebuilt without the cancelled entries once they are
    most of it, so that a login clock cancelled after a fast login does
    not stay for the --login_timeout it was set for.  The lock is
    re-entrant, so that a function may add a deadline."""

    def __init__(self):
        self._heap = []
        self._cancelled = 0     # entries in the heap whose function is gone
        self._serial = itertools.count()
        # add() and cancel() take the lock itself (a Condition's own with
        # costs two Python calls per login); the runner waits on it.
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._thread = None

    def add(self, seconds, function, *args):
        entry = Deadline(function, args)
        with self._lock:
            # (when, serial, entry): compared in C, the serial breaks ties.
            heapq.heappush(self._heap, (time.monotonic() + seconds,
                                        next(self._serial), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run,
                                                name="deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is entry:
                self._wakeup.notify()
        return entry

    def cancel(self, entry):
        """Drop the entry; False when its function has run already."""
        with self._lock:
            if entry.ran:
                return False
            if entry.function is not None:
                entry.function = entry.args = None
                self._cancelled += 1
                if self._cancelled > max(len(self._heap) // 2, 1024):
                    self._heap = [item for item in self._heap
                                  if item[2].function is not None]
                    heapq.heapify(self._heap)
                    self._cancelled = 0
            return True

    def __len__(self):
        """Entries in the heap, cancelled ones not yet dropped included."""
        return len(self._heap)

    def _run(self):
        with self._lock:
            while True:
                if not self._heap:
                    self._wakeup.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._wakeup.wait(delay)
                    continue
                entry = heapq.heappop(self._heap)[2]
                if entry.function is None:
                    self._cancelled -= 1
                else:
                    entry.ran = True
                    try:
                        entry.function(*entry.args)
                    except Exception as e:
                        log.err("Deadline function failed: %s" % e)
                    entry.function = entry.args = None


class LoginFailureLimit:
    """--login_failure_limit: the times of the latest failed logins of each
    client address, across connections.  At most MAX_FAILURE_ADDRESSES
    addresses are kept, the one not seen longest dropped first, and each
    keeps at most COUNT times."""

    def __init__(self):
        self._failures = collections.OrderedDict()   # address -> deque
        self._lock = threading.Lock()

    def blocked(self, address, limit):
        """Whether `address` has failed COUNT times within SECONDS."""
        now = time.monotonic()
        with self._lock:
            times = self._failures.get(address)
            if times is None:
                return False
            while times and now - times[0] >= limit.seconds:
                times.popleft()
            if not times:
                del self._failures[address]
            return len(times) >= limit.count

    def failed(self, address, limit):
        with self._lock:
            times = self._failures.pop(address, None)
            if times is None or times.maxlen != limit.count:
                times = collections.deque(times or (), limit.count)
            times.append(time.monotonic())
            self._failures[address] = times
            if len(self._failures) > MAX_FAILURE_ADDRESSES:
                self._failures.popitem(last=False)


def environment_address(side):
    """(ip, port) from ucspi-tcp's TCP<side>IP and TCP<side>PORT; an
    empty string for what is not set or not valid."""
    ip = os.environ.get("TCP%sIP" % side, "")
    port = os.environ.get("TCP%sPORT" % side, "")
    try:
        ip = plain_address((str(ipaddress.ip_address(ip)), None))[0]
    except ValueError:
        ip = ""
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return ip, ""
    return ip, int(port)


def connection_addresses(sock):
    """(client_ip, client_port, server_ip, server_port) of a connection.

    A peer without an IP address (a UNIX-domain socket under -i: stunnel's
    exec, socat, a supervisor's socketpair) is what tcpserver put in
    TCPREMOTEIP/TCPREMOTEPORT and TCPLOCALIP/TCPLOCALPORT, else empty: the
    log says unknown and the query-key escapes are empty."""
    peer = sock.getpeername()   # connected, or OSError
    if isinstance(peer, tuple):  # an IP address, not a UNIX-domain path
        return plain_address(peer) + plain_address(sock.getsockname())
    return environment_address("REMOTE") + environment_address("LOCAL")


class Session:
    """One client connection: greeting, login loop, then the pump.

    Sessions, connections and pumps have __slots__: thousands of idle
    sessions are held at once."""

    __slots__ = ("perdition", "generation", "config", "client", "client_ip",
                 "client_port", "server_ip", "server_port", "hostname",
                 "inetd_pid", "protocol", "user", "password", "authzid",
                 "backend", "attempts", "received", "sent", "tls_probe",
                 "server", "proxying", "interrupted", "login_clock",
                 "errors", "proxy_ttl", "session_id")

    def __init__(self, perdition, generation, sock, host, inetd_pid=None):
        self.perdition = perdition
        self.generation = generation        # kept to the session's end
        self.config = generation.config
        self.client = Connection(sock)
        self.client_ip, self.client_port, self.server_ip, self.server_port = \
            connection_addresses(sock)
        self.hostname = generation.hostnames[host]
        self.inetd_pid = inetd_pid
        self.protocol = perdition.protocol_class(self)
        self.user = self.password = self.authzid = ""
        self.backend = None
        self.attempts = 0
        self.received = self.sent = 0
        self.tls_probe = None
        self.server = None          # the real server's, once proxying
        self.proxying = False
        self.interrupted = None     # why another thread ended the login
        self.login_clock = None
        self.errors = 0             # failed logins and refused commands
        self.proxy_ttl = None       # hops left, as a proxy in front says
        self.session_id = None      # made when forwarded

    @property
    def client_name(self):
        """The client as the log names it."""
        return self.client_ip or "unknown"

    def run(self):
        config = self.config
        if config.proxy_protocol and not self.take_proxy_header():
            return
        log.info("Connect: %s%s" % (self.client_name, "[inetd_pid=%d]"
                                    % self.inetd_pid if self.inetd_pid
                                    else ""))
        server = None
        from_address = self.perdition.enter(self)
        try:
            if config.login_timeout:
                self.login_clock = self.perdition.deadlines.add(
                    config.login_timeout, self.interrupt, "Login timeout")
            try:
                self.client.sock.setsockopt(socket.IPPROTO_TCP,
                                            socket.TCP_NODELAY, 1)
            except OSError:         # a UNIX-domain socket under -i
                pass
            self.client.settimeout(config.authentication_timeout)
            if "ssl_listen" in config.ssl_mode:
                self.client.start_tls(self.generation.listen_context, True)
            limit = config.client_connection_limit
            if limit and from_address > limit:
                self.say_farewell("Too many connections from your address "
                                  "(client_connection_limit %d)" % limit)
                return
            self.reply(self.protocol.greeting(self.hostname))
            server = self.authenticate()
            if server is not None:
                self.server = server        # before proxying: see end()
                self.proxying = True
                Pump(self, server).run()
        except (EOFError, ClientGone):
            if self.interrupted:
                self.say_farewell(self.interrupted)
            else:
                log.debug("%s: client closed the connection"
                          % self.client_name)
        except ProtocolError as e:
            self.say_farewell(str(e))
            self.client.linger()
        except TimeoutError:
            self.say_farewell("Idle timeout")
        except (OSError, ssl.SSLError) as e:
            # An interrupted session cut off in a send (cut_off) is logged
            # for what interrupted it.
            log.info("%s: %s" % (self.client_name, self.interrupted or
                                 "connection error: %s" % e))
        finally:
            if self.login_clock is not None:
                self.perdition.deadlines.cancel(self.login_clock)
            self.perdition.leave(self)
            if server is not None:
                server.close()
            self.client.close()
            log.info('Close: %s user="%s" received=%d sent=%d'
                     % (self.client_name, log_text(self.user),
                        self.received, self.sent))

    def end(self):
        """The stop's grace period is over: a session still before login is
        interrupted, and says farewell; a proxied one is shut down both
        ways.  Called from the main thread holding Perdition.lock, which
        the session takes before it closes its sockets."""
        if self.proxying:
            self.client.shutdown()
            self.server.shutdown()
        else:
            self.interrupt("Server shutting down")

    def take_proxy_header(self):
        """--proxy_protocol: the client's (and the address it connected
        to) as the balancer's header gives them.  False when the
        connection is refused, which the log says why."""
        balancer = self.client_ip
        timeout = min(PROXY_HEADER_TIME, self.config.authentication_timeout
                      or PROXY_HEADER_TIME)
        try:
            try:
                trusted = any(ipaddress.ip_address(balancer) in network
                              for network in self.config.proxy_protocol)
            except ValueError:          # no IP address at all
                trusted = False
            if not trusted:
                raise ProtocolError("not a trusted source of PROXY headers")
            addresses = read_proxy_header(self.client.sock, timeout)
        except (ProtocolError, OSError, EOFError) as e:
            log.info("PROXY protocol: %s: %s, closing" % (
                balancer, str(e) or "closed before sending a header"))
            return False
        if addresses:
            (self.client_ip, self.client_port), \
                (self.server_ip, self.server_port) = addresses
        return True

    def interrupt(self, reason):
        """End the session before its login, from another thread (the
        login clock, a stop): the reason is kept and the client's reading
        side shut, which wakes the session's thread wherever it waits, for
        the client or (watching it) for the real server; that thread then
        says farewell with the reason.  A client that reads nothing may
        hold that thread in a send: FAREWELL_TIME later its socket is shut
        both ways, which ends the send."""
        self.interrupted = reason
        try:
            self.client.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        self.perdition.deadlines.add(FAREWELL_TIME, self.cut_off)

    def cut_off(self):
        try:
            self.client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:             # closed already
            pass

    def say_farewell(self, reason):
        log.info("%s: %s" % (self.client_name, reason))
        try:
            self.client.settimeout(1)
            self.reply(self.protocol.farewell(reason))
        except (OSError, ssl.SSLError):
            pass

    def authenticate(self):
        """Read credentials and try them on the real server until a login
        succeeds (returning the server connection) or the client quits."""
        protocol = self.protocol
        while True:
            credentials = protocol.serve()
            if credentials is None:
                return None
            self.user, self.password = credentials.user, credentials.password
            self.authzid = credentials.authzid
            self.attempts += 1
            self.backend = None
            limit = self.config.login_failure_limit
            blocked = limit and self.perdition.failures.blocked(
                self.client_ip, limit)
            try:
                try:
                    if blocked:
                        raise LoginFailure(
                            "login_failure_limit %d/%d reached" % limit,
                            "Too many failed logins, try again later")
                    if self.perdition.pam is not None:
                        self.authenticate_locally()
                    self.backend = self.generation.selector.select(
                        self.user, self.password, self)
                    server, line = self.login()
                except SERVER_ERRORS as e:
                    raise LoginFailure(server_error(e)) from None
                clock, self.login_clock = self.login_clock, None
                if clock is not None and \
                        not self.perdition.deadlines.cancel(clock):
                    server.close()          # the clock ran out just now
                    raise ClientGone
            except ClientGone:
                self.log_auth("failed: %s" % (self.interrupted or
                                              "client left during the login"))
                raise
            except LoginFailure as e:
                self.log_auth("failed: %s" % e)
                # No real server to be reached is no guess at a password.
                if not isinstance(e, ServerUnreachable):
                    if limit and not blocked:
                        self.perdition.failures.failed(self.client_ip, limit)
                    self.delay_failure()
                self.reply(protocol.failure(e.client_text
                                            or "Authentication failed"))
                self.count_error()
                continue
            self.log_auth("ok")
            self.reply(protocol.ok(line))
            return server

    def authenticate_locally(self):
        """-a: PAM must accept the user, under the name rewritten for the
        local_authentication state, before any real server is contacted;
        a refusal is a LoginFailure like a refusal by the real server."""
        user = self.generation.user_names.rewrite(
            self.user, "local_authentication", self.server_ip)
        log.debug("Local authentication of %s as %s"
                  % (log_text(self.user), log_text(user)))
        self.perdition.pam.authenticate(user, self.password, self.client_ip)

    def count_error(self):
        """--max_errors: after so many failed logins and refused commands
        on one connection, as nginx counts them, the client is let go."""
        self.errors += 1
        limit = self.config.max_errors
        if limit and self.errors >= limit:
            raise ProtocolError("Too many errors")

    def delay_failure(self):
        """--auth_failure_delay: the answer to a failed login waits, in
        this session's thread alone, so guessing passwords is slow."""
        delay = self.config.auth_failure_delay
        if delay:
            log.info("%s: answering the failed login in %d s "
                     "(auth_failure_delay)" % (self.client_name, delay))
            time.sleep(delay)

    def login(self):
        """Log in on the first of the chosen servers that can be reached:
        (connection, line).  One that cannot is held back for
        --server_hold_time and the next one tried; a refusal of the
        credentials is an answer, never a reason to try another."""
        if self.hops_left() <= 0:
            raise LoginFailure("Proxy loop: no hops left (x-proxy-ttl/TTL "
                               "%d)" % self.proxy_ttl, "Too many proxy hops")
        backend, holds = self.backend, self.perdition.holds
        servers = holds.order(backend.servers)
        for n, server in enumerate(servers, 1):
            backend.host, backend.port = server
            try:
                return self.login_at()
            except ServerUnreachable as e:
                if self.config.server_hold_time:
                    holds.hold((backend.host, backend.port),
                               self.config.server_hold_time)
                log.info("Server %s port %d failed: %s%s" % (
                    log_text(backend.host), backend.port, e,
                    "; trying the next" if n < len(servers) else ""))
                if n == len(servers):
                    raise

    def login_at(self):
        """Connect to backend.host and log in there: (connection, line).

        At most three connections: the first may meet a self-signed
        certificate the options accept, a probe learns it, the third uses
        it."""
        self.tls_probe = None
        for _ in range(3):
            server = self.connect(self.backend)
            try:
                line = self.log_in_to(server)
            except BaseException:
                server.close()
                raise
            if line is not None:
                server.watched = None       # the pump takes over
                return server, line
            server.close()
        raise ServerUnreachable("TLS: the server's certificate keeps "
                                "changing")

    def note_proxy_ttl(self, ttl):
        """A proxy in front says how many hops the login has left (IMAP
        x-proxy-ttl, POP3 XCLIENT TTL=); the lowest counts."""
        self.proxy_ttl = ttl if self.proxy_ttl is None \
            else min(ttl, self.proxy_ttl)

    def hops_left(self):
        """What this hop passes on: one less than it was given."""
        return (PROXY_TTL if self.proxy_ttl is None else self.proxy_ttl) - 1

    def forwarded(self):
        if self.session_id is None:
            self.session_id = binascii.b2a_base64(os.urandom(9),
                                                  newline=False).decode()
        return Forwarded(self.client_ip, self.client_port, self.server_ip,
                         self.server_port, self.session_id, self.hops_left())

    def log_in_to(self, server):
        """The back-end login, one sequence for every protocol, which
        supplies the parts: TLS at once (ssl_outgoing), the greeting and
        capabilities, STARTTLS (tls_outgoing; what the server said before
        it is forgotten), the login.  Returns the server's final line, or
        None when the connection must be made again to learn or use a
        certificate.  Whatever fails before the credentials are sent,
        within --connect_timeout, leaves the server unreachable."""
        protocol = self.protocol
        try:
            if "ssl_outgoing" in self.config.ssl_mode and \
                    not self.handshake_outgoing(server):
                return None
            capabilities = protocol.server_greeting(server)
            if self.tls_outgoing():
                if capabilities is None:
                    capabilities = protocol.server_capabilities(server)
                if self.start_tls_outgoing(
                        server, protocol.start_tls_command in capabilities):
                    protocol.server_start_tls(server)
                    if not self.handshake_outgoing(server):
                        return None
                    capabilities = protocol.server_after_tls(server)
        except LoginFailure as e:
            raise ServerUnreachable(str(e), e.client_text) from None
        except SERVER_ERRORS as e:
            raise ServerUnreachable(server_error(e)) from None
        server.deadline = None      # --authentication_timeout from now on
        if self.config.forward_client_address:
            capabilities = protocol.server_forward(server, capabilities,
                                                   self.forwarded())
        return protocol.server_login(server, capabilities, self.backend,
                                     Credentials(self.user, self.password,
                                                 self.authzid))

    def log_auth(self, status):
        mode = self.config.log_passwd
        show = mode == "always" or (mode == "ok" and status == "ok") or \
            (mode == "fail" and status != "ok")
        backend = self.backend
        log.info('Auth: %s user="%s" passwd="%s" server="%s" port="%s" '
                 'status=%s' % (self.client_name, log_text(self.user),
                                log_text(self.password) if show else "XXXXXX",
                                log_text(backend.host) if backend else "",
                                backend.port if backend else "",
                                log_text(status)))

    # -- the client side ---------------------------------------------------

    def read_client_bytes(self):
        """The next line; none once the session is interrupted, though
        the client may have sent more (which a shut reading side still
        gives)."""
        if self.interrupted:
            raise ClientGone
        return self.client.readline()

    def read_client_line(self):
        return self.read_client_bytes().decode("utf-8", "surrogateescape")

    def reply(self, text, continuation=False):
        self.log_dialogue("perdition", text, continuation)
        self.client.sendall(text.encode("utf-8", "surrogateescape")
                            + b"\r\n")

    def log_dialogue(self, who, text, continuation=False):
        """-C with -d: log a line of the login dialogue, its secrets masked
        by the protocol's rule unless --log_passwd always; `continuation`
        marks a line inside an authentication exchange."""
        if self.config.connection_logging and log.debug_enabled:
            if isinstance(text, bytes):
                text = text.decode("utf-8", "surrogateescape")
            if self.config.log_passwd != "always":
                text = self.protocol.redact(text, continuation)
            log.debug("%s %s: %s" % (self.client_name, who,
                                     log_text(text)))

    def tls_offered(self):
        return "tls_listen" in self.config.ssl_mode and self.client.tls is None

    def tls_required(self):
        return "tls_listen_force" in self.config.ssl_mode \
            and self.client.tls is None

    def login_refusal(self):
        """Why logging in is not allowed now, or None when it is."""
        if self.config.login_disabled:
            return "Login disabled"
        if self.tls_required():
            return "Login disabled until %s has been issued" \
                % self.protocol.start_tls_command
        return None

    def start_tls_listen(self):
        self.client.start_tls(self.generation.listen_context, True)

    # -- the server side ---------------------------------------------------

    def connect(self, backend):
        """A plaintext connection to the real server."""
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV \
            if self.config.no_lookup else 0
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(
                backend.host).version == 6 else socket.AF_INET
            addresses = [(family, socket.SOCK_STREAM, 0, "",
                          (backend.host, backend.port))]
        except ValueError:      # a name: resolve it
            try:
                addresses = socket.getaddrinfo(backend.host, backend.port, 0,
                                               socket.SOCK_STREAM, 0, flags)
            except (OSError, UnicodeError) as e:
                raise ServerUnreachable("Could not resolve %s: %s"
                                        % (backend.host, e)) from None
        error = None
        connect_timeout = self.config.connect_timeout
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            deadline = time.monotonic() + connect_timeout \
                if connect_timeout else None
            try:
                sock.settimeout(connect_timeout or
                                self.config.authentication_timeout or None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.connect(address)
                break
            except OSError as e:
                sock.close()
                error = e
        else:
            raise ServerUnreachable("Could not connect to %s:%s: %s"
                                    % (backend.host, backend.port, error))
        return Connection(sock, watched=self.client,
                          wait=self.config.authentication_timeout or None,
                          deadline=deadline)

    def tls_outgoing(self):
        return "tls_outgoing" in self.config.ssl_mode

    def start_tls_outgoing(self, server, offered):
        """Whether to STARTTLS now; without TLS, tls_outgoing_force sends no
        credentials."""
        if offered:
            return True
        if "tls_outgoing_force" in self.config.ssl_mode:
            raise LoginFailure("Server does not offer %s and "
                               "tls_outgoing_force is set"
                               % self.protocol.start_tls_command)
        return False

    def handshake_outgoing(self, server):
        """TLS towards the real server, verified as the options say.  False
        when the connection must be made again: a self-signed certificate
        the options accept was met (the next connection is a probe that
        sends no credentials) or has just been learned on a probe."""
        tls = self.generation.outgoing_tls
        host, port = self.backend.host, self.backend.port
        context = tls.context_for(host, port, self.tls_probe is not None)
        try:
            server.start_tls(context, False,
                             host if context.check_hostname else None)
            if self.tls_probe is not None:
                tls.pin(host, port, server, self.tls_probe)
                self.tls_probe = None
                return False
            tls.check(server)
        except ssl.SSLCertVerificationError as e:
            if e.verify_code in tls.accepted_codes and tls.probe_context:
                self.tls_probe = e.verify_code
                return False
            raise LoginFailure("TLS: %s" % e.verify_message) from None
        except ssl.SSLError as e:
            raise LoginFailure("TLS: %s" % e) from None
        return True

    def read_server_line(self, server, continuation=False):
        line = server.readline().decode("utf-8", "surrogateescape")
        self.log_dialogue("server", line, continuation)
        return line

    def server_lines(self, server):
        """The real server's lines for one answer: a bounded number."""
        for _ in range(MAX_SERVER_LINES):
            yield self.read_server_line(server)
        raise ProtocolError("Server sent too many lines")

    def read_server_lines(self, server):
        """A POP3 multi-line answer, up to its '.' line."""
        lines = []
        for line in self.server_lines(server):
            if line == ".":
                return lines
            lines.append(line[1:] if line.startswith(".") else line)

    def send_server(self, server, text, continuation=False):
        if isinstance(text, str):
            text = text.encode("utf-8", "surrogateescape")
        self.log_dialogue("to server", text, continuation)
        server.check_watched()      # credentials for no one are not sent
        server.sendall(text + b"\r\n")

    def check_greeting(self, greeting):
        """perdition connecting to itself would loop for ever."""
        if greeting.strip() == self.protocol.own_greeting(self.hostname):
            raise LoginFailure("Re-Authentication Failure",
                               "Re-Authentication Failure")


# ---------------------------------------------------------------------------
# The pump
# ---------------------------------------------------------------------------

SPLICE = hasattr(os, "splice")
PIPE_SIZE = 256 * 1024
BURST = 16384       # a read this large starts (and keeps up) a splice burst
FIRST_READ = 1024   # the buffer a pump holds while it waits


class PipePool:
    """Pipes for os.splice, shared by all sessions.

    A pump holds a pipe only during a burst of bulk data, so idle sessions
    cost no file descriptors beyond their two sockets.  A pipe is
    (read end, write end, capacity).
    """

    def __init__(self, keep=64):
        self._pipes = []
        self._keep = keep
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._pipes:
                return self._pipes.pop()
        read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            size = fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            size = fcntl.fcntl(write, fcntl.F_GETPIPE_SZ)
        return read, write, size

    def put(self, pipe, clean):
        """Keep an empty pipe for the next burst; close one with data in."""
        with self._lock:
            if clean and len(self._pipes) < self._keep:
                self._pipes.append(pipe)
                return
        os.close(pipe[0])
        os.close(pipe[1])


class Workers:
    """Threads for sessions and pumps, kept a while after their task.

    Starting a thread costs tens of microseconds of CPU with the GIL held,
    twice per session; under load a finished thread is soon given the next
    task instead.  At most `keep` threads wait, each for `linger` seconds,
    so a burst's threads do not stay.  Tasks handle their own errors.
    """

    def __init__(self, keep=64, linger=5.0):
        self._idle = []             # waiting workers, the latest last
        self._keep = keep
        self._linger = linger
        self._lock = threading.Lock()

    def start(self, function, *args):
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            _thread.start_new_thread(self._work, (function, args))
        else:
            worker[1] = (function, args)
            worker[0].release()

    def _work(self, function, args):
        worker = [_thread.allocate_lock(), None]    # [wake-up, task]
        worker[0].acquire()
        while True:
            function(*args)
            function = args = None      # hold no session while waiting
            with self._lock:
                if len(self._idle) >= self._keep:
                    return
                self._idle.append(worker)
            if not worker[0].acquire(timeout=self._linger):
                with self._lock:
                    if worker in self._idle:
                        self._idle.remove(worker)
                        return
                worker[0].acquire()     # a task is on its way
            (function, args), worker[1] = worker[1], None


class Pump:
    """Copies bytes both ways, unchanged, until either side closes.

    The session's thread copies client to server and one more thread copies
    server to client.  The idle timeout counts activity in either direction.

    Between two plaintext sockets the sockets block, with SO_RCVTIMEO and
    SO_SNDTIMEO as the idle clock's tick, so a small message costs one
    recv() and one send() (a pump waits with a FIRST_READ buffer, small
    since idle sessions are many); once a read fills BURST, the burst goes
    through a pipe with os.splice and never enters Python.
    With TLS on either side the bytes pass through Connection, which
    serialises the calls on each SSL object.
    """

    __slots__ = ("session", "client", "server", "timeout", "last_activity",
                 "tick")

    def __init__(self, session, server):
        self.session = session
        self.client = session.client
        self.server = server
        self.timeout = session.config.timeout
        self.last_activity = time.monotonic()
        self.tick = self.timeout / 2 if self.timeout else None

    def run(self):
        session, client, server = self.session, self.client, self.server
        if server.buffer:                       # read ahead of the login
            session.sent += len(server.buffer)
            client.sendall(server.recv(len(server.buffer)))
        if client.buffer:
            session.received += len(client.buffer)
            server.sendall(client.recv(len(client.buffer)))
        if client.tls is None and server.tls is None:
            copy = self.plain
            for sock in (client.sock, server.sock):
                self.block_with_tick(sock)
        else:
            copy = self.stream
            client.settimeout(self.tick)
            server.settimeout(self.tick)
        done = _thread.allocate_lock()
        done.acquire()
        session.perdition.workers.start(self.copy, copy, server, client,
                                        "sent", done)
        self.copy(copy, client, server, "received")
        done.acquire()

    def block_with_tick(self, sock):
        sock.settimeout(None)
        if self.tick:
            tick = struct.pack("ll", int(self.tick),
                               int(self.tick % 1 * 1000000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tick)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tick)

    def copy(self, copy, source, destination, counter, done=None):
        """One direction.  The end of the client's input is passed on as a
        half-close, so that the server's last words still reach the client;
        any other end shuts both sockets down, which ends the other
        direction too.  `done` is released at the end."""
        how = socket.SHUT_RDWR
        try:
            copy(source, destination, counter)
            if source is self.client:
                how = socket.SHUT_WR
        except TimeoutError:
            log.info("%s: idle timeout" % self.session.client_name)
        except (OSError, ssl.SSLError, ValueError) as e:
            log.debug("%s: %s" % (self.session.client_name, e))
        finally:
            destination.shutdown(how)
            if how == socket.SHUT_RDWR:
                source.shutdown()
            if done is not None:
                done.release()

    def idle(self):
        """Called when a wait times out: raise TimeoutError when neither
        direction has moved for --timeout seconds."""
        if time.monotonic() - self.last_activity >= self.timeout:
            raise TimeoutError

    def count(self, counter, size):
        session = self.session
        setattr(session, counter, getattr(session, counter) + size)

    def stream(self, source, destination, counter):
        while True:
            try:
                data = source.recv(PIPE_SIZE)
            except TimeoutError:
                self.idle()
                continue
            if not data:
                return
            self.last_activity = time.monotonic()
            destination.sendall(data)
            self.count(counter, len(data))

    def patiently(self, call, *args):
        """call(*args) on a blocking socket, waiting out the ticks of
        SO_RCVTIMEO and SO_SNDTIMEO until the idle timeout."""
        while True:
            try:
                return call(*args)
            except BlockingIOError:
                self.idle()

    def plain(self, source, destination, counter):
        receive, send = source.sock.recv, destination.sock.send
        while True:
            # A small buffer while waiting: idle sessions are many.
            data = self.patiently(receive, FIRST_READ)
            if not data:
                return
            if len(data) == FIRST_READ:
                try:
                    data += receive(BUFFER_SIZE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
            self.last_activity = time.monotonic()
            view = memoryview(data)
            while view:
                view = view[self.patiently(send, view):]
            self.count(counter, len(data))
            if SPLICE and len(data) >= BURST and \
                    not self.splice(source.fileno(), destination.fileno(),
                                    counter):
                return

    def splice(self, source, destination, counter):
        """Move a burst through a pipe; False at end of input."""
        pipes = self.session.perdition.pipes
        pipe = pipes.get()
        read, write, capacity = pipe
        clean = False
        try:
            while True:
                size = self.patiently(os.splice, source, write, capacity)
                if not size:
                    clean = True
                    return False
                self.last_activity = time.monotonic()
                burst = size >= BURST
                while size:
                    moved = self.patiently(os.splice, read, destination, size)
                    size -= moved
                    self.count(counter, moved)
                if not burst:
                    clean = True
                    return True
        finally:
            pipes.put(pipe, clean)


# ---------------------------------------------------------------------------
# The server and main()
# ---------------------------------------------------------------------------

class Generation:
    """What one reading of the configuration makes: the options, the
    popmap, the server selector and user-name rules, the TLS contexts and
    the greeting host names.

    A session takes the current generation when it is accepted and keeps it
    to its end; a reload (SIGHUP) builds a whole new one and swaps it in
    with one assignment, so nothing changes under a running session.  A
    replaced generation's popmap is closed when its last session ends.
    """

    def __init__(self, config, hosts, number=1):
        self.config = config
        self.number = number
        self.sessions = 0       # sessions using it, under Perdition.lock
        self.retired = False
        self.popmap = open_popmap(config, reloading=number > 1)
        try:
            self.user_names = UserNames(config)
            self.selector = ServerSelector(config, self.popmap,
                                           self.user_names)
            modes = config.ssl_mode
            self.listen_context = make_listen_context(config) \
                if modes & {"ssl_listen", "tls_listen"} else None
            self.outgoing_tls = OutgoingTLS(config) \
                if modes & {"ssl_outgoing", "tls_outgoing"} else None
            # Keyed by the host each listener is bound to (None: all).
            self.hostnames = {host: greeting_hostname(config, host)
                              for host in hosts}
        except BaseException:
            self.close()
            raise

    def close(self):
        if self.popmap is not None:
            self.popmap.close()


def open_popmap(config, reloading=False):
    """The popmap -M and -m name, read once to see that it can be.  One
    that cannot stops a reload; at start-up it is logged, and lookups
    fail (the -s servers serve) until it can, as the C perdition's do."""
    if not config.map_library:
        return None
    if perdition_maps is None:
        raise OptionError("option -M, --map_library: perdition_maps.py "
                          "is not installed beside perdition.py; use "
                          "-M \"\" for no map")
    try:
        popmap = perdition_maps.open_map(config.map_library,
                                         config.map_library_opt)
        try:
            popmap.check()
        except perdition_maps.MapError as e:
            if reloading:
                popmap.close()
                raise
            log.err("Map %s cannot be read now, lookups fail until it can: "
                    "%s" % (config.map_library, e))
    except perdition_maps.MapError as e:
        raise OptionError("option -M, --map_library %s: %s"
                          % (config.map_library, e)) from None
    return popmap


class Perdition:
    """What lives as long as the process: the protocol, libpam (-a), worker
    threads, splice pipes, the open sessions and their count -- and the
    current Generation, which a reload replaces."""

    def __init__(self, config, hosts):
        self.protocol_class = PROTOCOLS[config.protocol].protocol_class
        self.pam = PAM() if config.authenticate_in else None
        self.hosts = hosts
        self.generation = Generation(config, hosts)
        self.pipes = PipePool()
        self.workers = Workers()
        self.active = 0         # admitted connections
        self.sessions = set()   # sessions running, for relog and the stop
        self.addresses = {}     # client address -> its sessions open
        self.deadlines = Deadlines()
        self.failures = LoginFailureLimit()
        self.holds = ServerHolds()
        self.lock = threading.Lock()
        self.ending = False     # the stop ends every session, late ones too
        self.wake = None        # told when the last session ends (a stop, -i)

    @property
    def config(self):
        """The current options; those a reload cannot change are the same
        in every generation."""
        return self.generation.config

    def reload(self):
        """Read the configuration again and swap a new generation in (a
        failure changes nothing), and reopen the log: after logrotate,
        whether or not the new configuration is good."""
        old = self.generation
        generation = None
        try:
            config, kept = old.config.reread()
            generation = Generation(config, self.hosts, old.number + 1)
            output = log.target(config)
        except Exception as e:      # OptionError names the FILE:LINE
            if generation is not None:
                generation.close()
            log.switch(old.config, log.target(old.config))
            log.err("Reload failed, keeping generation %d: %s"
                    % (old.number, e))
            return
        with self.lock:
            self.generation = generation
        self.retire(old)
        log.switch(config, output)
        for name, value in kept.items():
            log.err("Reload: option --%s cannot change without a restart; "
                    "keeping %s" % (name, format_value(value)))
        log.info("Reloaded: generation %d (from %s)" % (
            generation.number, config.config_file or "the command line"))

    def retire(self, generation):
        """A generation no new session will take: closed now if no session
        uses it, else when the last one ends."""
        with self.lock:
            generation.retired = True
            unused = not generation.sessions
        if unused:
            generation.close()

    def admit(self):
        """Count a new connection and hand it the current generation; None
        when --connection_limit is reached."""
        with self.lock:
            generation = self.generation
            limit = generation.config.connection_limit
            if limit and self.active >= limit:
                return None
            self.active += 1
            generation.sessions += 1
            return generation

    def release(self, generation):
        with self.lock:
            self.active -= 1
            generation.sessions -= 1
            unused = generation.retired and not generation.sessions
            if not self.active and self.wake is not None:
                try:
                    os.write(self.wake, b"\0")
                except OSError:
                    pass
        if unused:
            generation.close()

    def enter(self, session):
        """A session starts; returns how many its client's address now has
        open, for --client_connection_limit."""
        with self.lock:
            self.sessions.add(session)
            count = self.addresses.get(session.client_ip, 0) + 1
            self.addresses[session.client_ip] = count
            if self.ending:
                session.end()
            return count

    def leave(self, session):
        with self.lock:
            self.sessions.discard(session)
            address = session.client_ip
            count = self.addresses[address] - 1
            if count:
                self.addresses[address] = count
            else:
                del self.addresses[address]

    def end_sessions(self):
        """End every session, and those about to start: the stop's grace
        period is over."""
        with self.lock:
            self.ending = True
            for session in self.sessions:
                session.end()

    def status(self):
        return "%d sessions open" % self.active

    def relog(self):
        """Log the Auth line of every proxied session again, every
        --connect_relog seconds (as the current generation says), for POP
        and IMAP before SMTP."""
        while True:
            time.sleep(self.config.connect_relog or RELOG_RECHECK)
            if not self.config.connect_relog:
                continue
            with self.lock:
                sessions = [s for s in self.sessions if s.proxying]
            for session in sessions:
                session.log_auth("ok")


def address_text(address):
    """A socket address for the log: 'host port N', a path, or unknown."""
    if isinstance(address, tuple):
        return "%s port %d" % address[:2]
    return address or "unknown"


class PerditionServer(socketserver.ThreadingTCPServer):
    """One listening address, a thread per connection.

    The threads are bare _thread threads from Workers, neither tracked
    nor joined: threading.Thread's bookkeeping costs kilobytes per session,
    and block_on_close would walk a list of them on every accept.
    """

    block_on_close = False
    allow_reuse_address = True
    request_queue_size = getattr(socket, "SOMAXCONN", 128)

    def __init__(self, perdition, address, host, sock=None):
        """Bind `address`, or serve `sock`, a listening socket a service
        manager passed."""
        self.perdition = perdition
        self.host = host        # the key of the greeting host name
        if sock is None:
            self.address_family = socket.AF_INET6 if ":" in address[0] \
                else socket.AF_INET
            super().__init__(address, Session)
            return
        self.address_family = sock.family
        super().__init__(address, Session, bind_and_activate=False)
        self.socket.close()
        self.socket = sock

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                                   self.server_address[0] != "::")
        super().server_bind()

    def process_request(self, request, client_address):
        generation = self.perdition.admit()
        if generation is None:
            log.info("Connection limit reached, refusing %s"
                     % address_text(client_address).partition(" ")[0])
            try:
                request.settimeout(1)
                request.sendall(self.perdition.protocol_class.farewell(
                    "Too many connections, try again later").encode()
                    + b"\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            self.perdition.workers.start(self.process_request_thread,
                                         request, client_address, generation)
        except BaseException:
            self.perdition.release(generation)
            raise

    def process_request_thread(self, request, client_address, generation):
        """socketserver's, with the generation the connection was admitted
        with."""
        try:
            self.finish_request(request, client_address, generation)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.perdition.release(generation)
            self.shutdown_request(request)

    def finish_request(self, request, client_address, generation):
        try:
            session = self.RequestHandlerClass(self.perdition, generation,
                                               request, self.host)
        except OSError:         # gone before we could look at it
            return
        session.run()

    def shutdown_request(self, request):
        """A session shuts its connection down itself; what is left is to
        close the socket, without a shutdown() that can only fail."""
        self.close_request(request)

    def handle_error(self, request, client_address):
        log.err("Session from %s failed: %s" % (
            address_text(client_address).partition(" ")[0],
            traceback.format_exc().replace("\n", " | ")))


def greeting_hostname(config, host):
    """The name in the greeting: the reverse lookup of the bind address,
    unless -B or -n, else the uname host name."""
    if host and not config.no_bind_banner and host not in ("0.0.0.0", "::"):
        try:
            return socket.gethostbyaddr(host)[0]
        except OSError:
            pass
    return os.uname().nodename


def listen_addresses(config):
    """(host, port) to bind: -b entries, or every address."""
    if not config.bind_address:
        host = "::" if socket.has_dualstack_ipv6() else "0.0.0.0"
        return [(host, config.listen_port)]
    return [(host, port or config.listen_port)
            for host, port in config.bind_address]


def greeting_host(config, host):
    """The host whose reverse lookup names a listener in the greeting:
    its -b address, None when it listens on every address."""
    return host if config.bind_address else None


def listen_hosts(config, inherited):
    """The greeting_host of each listener: of the sockets a service manager
    passed (their own addresses), or of those to bind; under inetd, of the
    first -b address."""
    if config.inetd_mode:
        return [config.bind_address[0][0] if config.bind_address else None]
    if inherited:
        return [sock.getsockname()[0] if sock.family != socket.AF_UNIX
                else None for sock in inherited]
    return [greeting_host(config, host)
            for host, _ in listen_addresses(config)]


SD_LISTEN_FDS_START = 3


def listen_fds():
    """The sockets a service manager passed (sd_listen_fds(3)): LISTEN_FDS
    descriptors from 3 on, when LISTEN_PID names this process.  The
    variables are then removed, so that nothing started later takes the
    descriptors for its own."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not (count.isascii() and count.isdigit()):
        raise OptionError("LISTEN_FDS: %r is not a number" % count)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            sock = socket.socket(fileno=fd)
            if sock.type != socket.SOCK_STREAM:
                raise OSError(0, "not a stream socket")
            sock.set_inheritable(False)
        except OSError as e:
            raise OptionError("LISTEN_FDS: descriptor %d: %s"
                              % (fd, e.strerror)) from None
        sockets.append(sock)
    return sockets


def adopt_servers(perdition, inherited):
    """Serve the listening sockets a service manager passed (systemd's
    Accept=no) instead of binding: -b and -l do not apply."""
    servers = []
    for sock, host in zip(inherited, perdition.hosts):
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OptionError("LISTEN_FDS: descriptor %d is not listening "
                              "(for Accept=yes run perdition -i)"
                              % sock.fileno())
        servers.append(PerditionServer(perdition, sock.getsockname(), host,
                                       sock))
    return servers


def bind_servers(perdition):
    config = perdition.config
    servers = []
    for host, port in listen_addresses(config):
        try:
            servers.append(PerditionServer(perdition, (host, port),
                                           greeting_host(config, host)))
        except OSError as e:
            for server in servers:
                server.server_close()
            raise OptionError("cannot listen on %s port %d (option -b/-l): "
                              "%s" % (host, port, e.strerror or e)) from None
    return servers


def daemonise():
    """Detach from the terminal: fork twice, new session, stdio to null.
    The working directory stays (as nginx's does), so that a relative path
    on the command line or in the configuration file names the same file
    at a reload as at start-up."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    log.forked()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def run_as(config):
    """The uid and gid of -u/-g.  The default group 'nobody' does not exist
    everywhere (Debian calls it nogroup): then the user's own group."""
    try:
        user = pwd.getpwnam(config.username)
    except KeyError:
        raise OptionError("option -u, --username: unknown user %r"
                          % config.username) from None
    try:
        gid = grp.getgrnam(config.group).gr_gid
    except KeyError:
        if "group" in config.given or config.group != "nobody":
            raise OptionError("option -g, --group: unknown group %r"
                              % config.group) from None
        gid = user.pw_gid
    return user.pw_uid, gid


def write_pid_file(config, uid, gid):
    """Write --pid_file, unless empty; returns its path, or None.

    Whatever is in its place -- a stale file, or a link planted to make
    root write elsewhere -- is removed, not followed, and the file created
    anew (O_EXCL, O_NOFOLLOW).  A default one that cannot be written is
    only logged in the foreground, where nothing needs it; one asked for
    must be written.  Its directory is given to -u/-g, so that perdition
    can remove the file after dropping privileges, only when it is
    perdition's own: the default one, or one perdition makes now -- never
    a directory others share, such as /run or /tmp."""
    path = config.pid_file
    if not path:
        return None
    try:
        directory = os.path.dirname(path)
        own = not os.path.isdir(directory) or directory == os.path.join(
            VAR_STATE_DIR, config.basename)
        os.makedirs(directory, exist_ok=True)
        if uid is not None and own:
            os.chown(directory, uid, gid, follow_symlinks=False)
        elif uid is not None and os.geteuid() == 0 and uid != 0:
            log.info("The pid file %s will stay when perdition stops: "
                     "its directory is not perdition's own to give to "
                     "-u %s" % (path, config.username))
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                     | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "w") as f:
            f.write("%d\n" % os.getpid())
    except OSError as e:
        message = "option --pid_file: %s: %s" % (path, e.strerror)
        if config.daemon or "pid_file" in config.given:
            raise OptionError(message) from None
        log.err("Cannot write the pid file, carrying on: %s" % message)
        return None
    return path


def remove_pid_file(path):
    """Remove the pid file if it is still this process's: another perdition
    may have written its own in its place since."""
    if path:
        try:
            with open(path) as f:
                if f.read().strip() != str(os.getpid()):
                    return
            os.unlink(path)
        except OSError as e:
            log.err("Cannot remove the pid file %s: %s" % (path, e.strerror))


def drop_privileges(uid, gid):
    """Become -u/-g; after binding, so ports below 1024 work."""
    if os.geteuid() != 0:
        log.debug("Not running as root; keeping uid %d" % os.geteuid())
        return
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)


def serve_inetd(perdition, inherited):
    """-i: one session on a connected stream socket, TCP or UNIX-domain:
    standard input, as inetd, tcpserver, stunnel or socat give it, or the
    connection a service manager passed (systemd's Accept=yes).

    The session runs in a thread while the main thread watches the
    signals, as when serving: SIGTERM or SIGINT stops it gracefully (the
    grace period, a farewell before login, its Close line); SIGHUP, with
    one session to serve and no configuration to keep, changes nothing."""
    where = "the socket in LISTEN_FDS" if inherited else "standard input"
    try:
        if len(inherited) > 1:
            raise OSError(0, "more than one socket")
        sock = inherited[0] if inherited else socket.socket(fileno=os.dup(0))
        if sock.type != socket.SOCK_STREAM:
            raise OSError(0, "not a stream socket")
        sock.getpeername()
    except OSError:
        raise OptionError("option -i, --inetd_mode: %s is not a connected "
                          "stream socket" % where) from None
    read, write = watch_signals()
    generation = perdition.admit()
    perdition.wake = write          # told when the session has ended
    session = Session(perdition, generation, sock, perdition.hosts[0],
                      inetd_pid=os.getpid())

    def run():
        try:
            session.run()
        finally:
            perdition.release(generation)
    perdition.workers.start(run)
    while perdition.active:
        signals = wait_for_signals(read, None)
        stop = next((signum for signum in signals if signum in STOPS), None)
        if stop is not None:
            return shut_down(perdition, (), read, write, stop)
    return 0


def raise_file_limit(config):
    """Sessions need two descriptors each; take what the hard limit gives."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    except (ValueError, OSError):
        return
    if config.connection_limit and soft != resource.RLIM_INFINITY and \
            soft < 2 * config.connection_limit + 64:
        log.err("File descriptor limit %d is too low for connection_limit "
                "%d" % (soft, config.connection_limit))


def notify(state):
    """Tell the service manager: sd_notify(3)'s datagram to $NOTIFY_SOCKET
    (a name starting with '@' is in the abstract namespace), when set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX,
                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.err("Cannot notify the service manager at %s: %s"
                % (log_text(address), e.strerror or e))


def watch_signals():
    """SIGHUP, SIGTERM and SIGINT go to a pipe, read by the main thread.

    The interpreter's C-level handler writes each signal's number there
    (signal.set_wakeup_fd) and the Python one does nothing: no signal
    handler may take a lock or log, or a signal arriving on a thread that
    holds the log's lock deadlocks the process.  Returns (read, write)."""
    read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, recorded)
    return read, write


def recorded(signum, frame):
    """The Python-level handler: the signal is in the pipe already."""


def wait_for_signals(pipe, timeout):
    """The signal numbers read from the pipe within `timeout` seconds (None:
    until one comes); 0 stands for the end of the last session in a
    stop."""
    poll = select.poll()
    poll.register(pipe, select.POLLIN)
    if not poll.poll(None if timeout is None else timeout * 1000):
        return b""
    try:
        return os.read(pipe, 512)
    except BlockingIOError:
        return b""


STOPS = (signal.SIGTERM, signal.SIGINT)


def reloader(perdition, requests):
    """The reload thread: one reload at a time; requests that arrive
    during one fold into one more."""
    while True:
        requests.wait()
        requests.clear()
        notify("RELOADING=1\nMONOTONIC_USEC=%d"
               % (time.monotonic_ns() // 1000))
        perdition.reload()
        notify("READY=1\nSTATUS=" + perdition.status())


def serve(perdition, servers, pipe):
    """The main thread once serving: act on the signals the pipe brings
    (SIGHUP: a reload, in the reload thread; SIGTERM or SIGINT: stop) and
    keep the service manager's STATUS= up to date."""
    read, write = pipe
    requests = threading.Event()
    threads = [threading.Thread(target=server.serve_forever, daemon=True,
                                args=(0.1,))    # a stop waits this long
               for server in servers]
    threads.append(threading.Thread(target=reloader, daemon=True,
                                    args=(perdition, requests)))
    threads.append(threading.Thread(target=perdition.relog, daemon=True))
    for thread in threads:
        thread.start()
    for server in servers:
        log.info("Listening on %s" % address_text(server.server_address))
    status = perdition.status()
    notify("READY=1\nSTATUS=" + status)
    watching = STATUS_INTERVAL if os.environ.get("NOTIFY_SOCKET") else None
    while True:
        signals = wait_for_signals(read, watching)
        stop = next((signum for signum in signals if signum in STOPS), None)
        if stop is not None:
            return shut_down(perdition, servers, read, write, stop)
        if signal.SIGHUP in signals:
            requests.set()
        if watching and perdition.status() != status:
            status = perdition.status()
            notify("STATUS=" + status)


def shut_down(perdition, servers, read, write, signum):
    """The graceful stop: close the listening sockets at once, let the
    sessions run for --shutdown_timeout seconds (a second SIGTERM or SIGINT
    cuts that short), then end the rest."""
    notify("STOPPING=1")
    for server in servers:
        server.shutdown()
        server.server_close()
    grace = perdition.config.shutdown_timeout
    with perdition.lock:
        perdition.wake = write
        open_sessions = perdition.active
    log.info("Exiting on signal %s: %d sessions open, %d s to finish"
             % (signal.Signals(signum).name, open_sessions, grace))
    notify("STATUS=Stopping, " + perdition.status())
    wait_for_sessions(perdition, read, grace)
    left = perdition.active
    if left:        # a further signal here stops waiting for the Close lines
        perdition.end_sessions()
        wait_for_sessions(perdition, read, STOP_WAIT)
    perdition.retire(perdition.generation)
    log.info("Stopped: %d sessions were open, %d finished in the grace "
             "period, %d ended%s" % (
                 open_sessions, open_sessions - left, left,
                 ", %d did not close in time" % perdition.active
                 if perdition.active else ""))
    return 0


def wait_for_sessions(perdition, pipe, seconds):
    """Wait up to `seconds` for every session to end, or until a further
    SIGTERM or SIGINT."""
    deadline = time.monotonic() + seconds
    while perdition.active:
        left = deadline - time.monotonic()
        if left <= 0 or any(signum in STOPS for signum in
                            wait_for_signals(pipe, left)):
            return


def main(argv=None):
    argv = sys.argv if argv is None else argv
    try:
        config = Config(argv)
        if config.help:
            sys.stdout.write(usage(config.basename))
            return 0
        log.configure(config)
        inherited = listen_fds()
        perdition = Perdition(config, listen_hosts(config, inherited))
        uid, gid = run_as(config) if os.geteuid() == 0 else (None, None)
        if config.inetd_mode:
            if config.debug:
                log.debug("Starting: %s" % config.summary())
            drop_privileges(uid, gid)
            return serve_inetd(perdition, inherited)
        servers = adopt_servers(perdition, inherited) if inherited \
            else bind_servers(perdition)
        if config.daemon:
            daemonise()
        pid_file = write_pid_file(config, uid, gid)
    except OptionError as e:
        name = program_name(argv[0] if argv else "perdition")
        sys.stderr.write("%s: %s\n" % (name, e))
        if log.use_syslog or log.stream is not sys.stderr:
            log.err("Fatal error: %s" % e)
        return 1
    try:
        raise_file_limit(config)
        pipe = watch_signals()
        drop_privileges(uid, gid)
        threading.stack_size(THREAD_STACK_SIZE)
        log.info("Starting: %s" % config.summary())
        return serve(perdition, servers, pipe)
    finally:
        remove_pid_file(pid_file)


if __name__ == "__main__":
    sys.exit(main())
