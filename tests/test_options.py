"""Start-up and options (issue 2, item 1): the command line, the
configuration file, the default configuration file search, the protocol
picked by the program's name, and what perdition says when it cannot start.

Parsing is tested in-process through perdition.Config, which is what main()
builds; what only the program can show -- --help, exit statuses, the
environment variable, symlinked names, ``python3 -m perdition`` -- is tested
by running it.
"""

import imaplib
import ipaddress
import os
import poplib
import socket
import ssl
import subprocess
import sys

import pytest

from dovecot import free_port
from helpers import (PERDITION, Perdition, TIMEOUT, imap_connect,
                     perdition_env, pop3_connect, run_perdition)

MAIN = os.path.dirname(PERDITION)
sys.path.insert(0, MAIN)
import perdition  # noqa: E402

ALL_STATES = frozenset(perdition.STATES)
FLAG = (None, True)
# For every option: a value to give it, as written on the command line,
# and the setting that must result.
SAMPLES = {
    "add_domain": ("remote_login,2", (frozenset({"remote_login"}), 2)),
    "authentication_timeout": ("60", 60),
    "authenticate_in": FLAG,
    "no_bind_banner": FLAG,
    "bind_address": ("127.0.0.1:1110,[::1]:1111,localhost",
                     [("127.0.0.1", 1110), ("::1", 1111),
                      ("localhost", None)]),
    "connection_logging": FLAG,
    "connect_relog": ("0", 0),
    "client_server_specification": FLAG,
    "domain_delimiter": ("%", "%"),
    "debug": FLAG,
    "explicit_domain": ("example.org", "example.org"),
    "log_facility": ("local3", "local3"),
    "config_file": (os.devnull, os.devnull),
    "group": ("mail", "mail"),
    "help": FLAG,
    "capability": ("IMAP4 IMAP4REV1 LITERAL+", "IMAP4 IMAP4REV1 LITERAL+"),
    "inetd_mode": FLAG,
    "connection_limit": ("25", 25),
    "listen_port": ("1143", 1143),
    "login_disabled": FLAG,
    "log_passwd": ("fail", "fail"),
    "lower_case": ("servername_lookup,remote_login",
                   frozenset({"servername_lookup", "remote_login"})),
    "map_library": ("/usr/lib/libperditiondb_posix_regex.so.0",
                    "/usr/lib/libperditiondb_posix_regex.so.0"),
    "map_library_opt": ("/etc/perdition/popmap.re",
                        "/etc/perdition/popmap.re"),
    "no_daemon": FLAG,
    "no_lookup": FLAG,
    "ok_line": ('Welcome, "friend" #1 \\o/', 'Welcome, "friend" #1 \\o/'),
    "server_resp_line": FLAG,
    "protocol": ("imap4s", "IMAP4S"),
    "outgoing_port": ("pop3s", 995),
    "outgoing_server": ("mail.example.net:1110,127.0.0.1",
                        [("mail.example.net", 1110), ("127.0.0.1", None)]),
    "pid_file": ("/run/p/p.pid", "/run/p/p.pid"),
    "shutdown_timeout": ("3", 3),
    "strip_domain": ("all", ALL_STATES),
    "timeout": ("30", 30),
    "username": ("mail", "mail"),
    "username_from_database": FLAG,
    "auth_failure_delay": ("3", 3),
    "client_connection_limit": ("4", 4),
    "login_failure_limit": ("5/60", perdition.Rate(5, 60)),
    "login_timeout": ("90", 90),
    "connect_timeout": ("5", 5),
    "server_hold_time": ("30", 30),
    "max_errors": ("20", 20),
    "forward_client_address": FLAG,
    "proxy_protocol": ("10.0.0.0/8, 192.0.2.1,::1",
                       [ipaddress.ip_network("10.0.0.0/8"),
                        ipaddress.ip_network("192.0.2.1/32"),
                        ipaddress.ip_network("::1/128")]),
    "quiet": FLAG,
    "query_key": ("\\u,\\D\\d", ["\\u", "\\D\\d"]),
    "ssl_mode": ("tls_listen,ssl_outgoing",
                 frozenset({"tls_listen", "ssl_outgoing"})),
    "ssl_ca_chain_file": ("/etc/ssl/chain.pem", "/etc/ssl/chain.pem"),
    "ssl_ca_file": ("/etc/ssl/ca.pem", "/etc/ssl/ca.pem"),
    "ssl_ca_path": ("/etc/ssl/certs/", "/etc/ssl/certs/"),
    "ssl_ca_accept_self_signed": FLAG,
    "ssl_cert_file": ("/etc/ssl/cert.pem", "/etc/ssl/cert.pem"),
    "ssl_cert_accept_self_signed": FLAG,
    "ssl_cert_accept_expired": FLAG,
    "ssl_cert_accept_not_yet_valid": FLAG,
    "ssl_cert_verify_depth": ("3", 3),
    "ssl_key_file": ("/etc/ssl/key.pem", "/etc/ssl/key.pem"),
    "ssl_listen_ciphers": ("HIGH:!aNULL", "HIGH:!aNULL"),
    "ssl_outgoing_ciphers": ("ECDHE+AESGCM", "ECDHE+AESGCM"),
    "ssl_no_cert_verify": FLAG,
    "ssl_no_cn_verify": FLAG,
}
SAMPLED = [o for o in perdition.OPTIONS if o.long in SAMPLES]


@pytest.fixture(autouse=True)
def sysconfdir(tmp_path, monkeypatch):
    """An empty sysconfdir, so that no configuration file of the machine
    (Debian ships /etc/perdition/perdition.conf) is read in-process."""
    path = tmp_path / "etc"
    path.mkdir()
    monkeypatch.setattr(perdition, "SYSCONFDIR", str(path))
    monkeypatch.setattr(perdition, "VAR_STATE_DIR", str(tmp_path / "run"))
    return path


def config(*args, program="perdition"):
    return perdition.Config([program, *map(str, args)])


def write_conf(path, text):
    path.write_text(text)
    return str(path)


def conf_escape(value):
    """*value* written for the configuration file: backslash before each
    backslash, hash and quote; whitespace left as it is."""
    return "".join("\\" + c if c in "\\#'\"" else c for c in value)


def command_line_forms(option, value):
    """Every way of giving *option* on the command line."""
    longs = ("--" + name for name in (option.long,) + option.aliases)
    if option.arg is None:
        forms = [[name] for name in longs]
        if option.short:
            forms.append(["-" + option.short])
        return forms
    forms = []
    for name in longs:
        forms += [[name, value], [name + "=" + value]]
    if option.short:
        forms += [["-" + option.short, value], ["-" + option.short + value]]
    return forms


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

# The manual's options (with NOTES.md's restored headings): long name and
# short letter, and the other spellings that must mean the same option.
MANUAL_OPTIONS = {
    "add_domain": "A", "authentication_timeout": None, "authenticate_in": "a",
    "no_bind_banner": "B", "bind_address": "b", "connection_logging": "C",
    "connect_relog": None, "client_server_specification": "c",
    "domain_delimiter": "D", "debug": "d", "explicit_domain": "e",
    "log_facility": "F", "config_file": "f", "group": "g", "help": "h",
    "capability": "I", "inetd_mode": "i", "connection_limit": "L",
    "listen_port": "l", "login_disabled": None, "log_passwd": None,
    "lower_case": None, "map_library": "M", "map_library_opt": "m",
    "no_daemon": None, "no_lookup": "n", "ok_line": "O",
    "server_resp_line": "o", "protocol": "P", "outgoing_port": "p",
    "outgoing_server": "s", "pid_file": None, "strip_domain": "S",
    "timeout": "t", "username": "u", "username_from_database": "U",
    "quiet": "q", "query_key": None, "ssl_mode": None,
    "ssl_ca_chain_file": None, "ssl_ca_file": None, "ssl_ca_path": None,
    "ssl_ca_accept_self_signed": None, "ssl_cert_file": None,
    "ssl_cert_accept_self_signed": None, "ssl_cert_accept_expired": None,
    "ssl_cert_accept_not_yet_valid": None, "ssl_cert_verify_depth": None,
    "ssl_key_file": None, "ssl_listen_ciphers": None,
    "ssl_outgoing_ciphers": None, "ssl_no_cert_verify": None,
    "ssl_no_cn_verify": None,
}
MANUAL_ALIASES = {"authenticate_timeout": "authentication_timeout",
                  "pop_capability": "capability",
                  "imap_capability": "capability",
                  "server_ok_line": "server_resp_line"}


def test_every_option_of_the_manual_is_in_the_table():
    by_name = perdition.OPTIONS_BY_NAME
    for long, short in MANUAL_OPTIONS.items():
        assert by_name[long].long == long
        assert by_name[long].short == short
    for alias, long in MANUAL_ALIASES.items():
        assert by_name[alias] is by_name[long]


def test_samples_cover_every_option():
    assert set(SAMPLES) == {o.long for o in perdition.OPTIONS}


@pytest.mark.parametrize("option", SAMPLED, ids=lambda o: o.long)
def test_every_option_in_every_command_line_form(option):
    raw, expected = SAMPLES[option.long]
    for form in command_line_forms(option, raw):
        assert getattr(config(*form), option.long) == expected, form


def test_options_left_out_keep_their_defaults():
    defaults = config()
    assert (defaults.protocol, defaults.listen_port, defaults.outgoing_port,
            defaults.capability) == ("POP3", 110, 110, "UIDL  USER")
    assert (defaults.log_facility, defaults.log_passwd, defaults.timeout,
            defaults.authentication_timeout, defaults.connection_limit,
            defaults.username, defaults.group, defaults.ok_line) == \
        ("mail", "never", 1800, 1800, 0, "nobody", "nobody", "You are so in")
    assert defaults.map_library == "/usr/lib/libperditiondb_gdbm.so.0"
    assert defaults.pid_file == os.path.join(
        perdition.VAR_STATE_DIR, "perdition", "perdition.pid")
    assert not defaults.debug and not defaults.no_daemon
    assert defaults.ssl_mode == frozenset()


def test_short_flags_combine():
    combined = config("-dCql1143")
    assert (combined.debug, combined.connection_logging, combined.quiet,
            combined.listen_port) == (True, True, True, 1143)


def test_later_option_wins():
    assert config("-l", "1000", "--listen_port", "2000").listen_port == 2000


@pytest.mark.parametrize("name, protocol, port", [
    ("pop3", "POP3", 110), ("Pop3S", "POP3S", 995), ("imap4", "IMAP4", 143),
    ("IMAP4S", "IMAP4S", 993)])
def test_protocol_is_case_insensitive_and_sets_default_ports(name, protocol,
                                                             port):
    parsed = config("-P", name)
    assert (parsed.protocol, parsed.listen_port, parsed.outgoing_port) == \
        (protocol, port, port)
    imap = protocol.startswith("IMAP")
    assert parsed.capability == ("IMAP4 IMAP4REV1" if imap else "UIDL  USER")
    assert parsed.ssl_mode == (frozenset({"ssl_listen", "ssl_outgoing"})
                               if protocol.endswith("S") else frozenset())


@pytest.mark.parametrize("args, option, reason", [
    (["-l", "70000"], "listen_port", "out of range"),
    (["--listen_port", "nosuchservice"], "listen_port", "nosuchservice"),
    (["-p", "0"], "outgoing_port", "out of range"),
    (["-L", "-1"], "connection_limit", "-1"),
    (["-t", "soon"], "timeout", "soon"),
    (["--authenticate_timeout", "-5"], "authentication_timeout", "-5"),
    (["--connect_relog", "1.5"], "connect_relog", "1.5"),
    (["--ssl_cert_verify_depth", "deep"], "ssl_cert_verify_depth", "deep"),
    (["--log_passwd", "sometimes"], "log_passwd", "never, fail, ok, always"),
    (["-P", "SMTP"], "protocol", "SMTP"),
    (["--ssl_mode", "tls_sometimes"], "ssl_mode", "tls_sometimes"),
    (["--ssl_mode", "ssl_listen,tls_listen"], "ssl_mode", "both"),
    (["-b", "127.0.0.1:notaport"], "bind_address", "notaport"),
    (["-b", "[::1"], "bind_address", "[::1"),
    (["-s", "bad host!"], "outgoing_server", "bad host!"),
    (["-F", "nosuchfacility"], "log_facility", "nosuchfacility"),
    (["--pid_file", "relative.pid"], "pid_file", "full path"),
    (["-A", "everywhere"], "add_domain", "everywhere"),
    (["-S", "servername_lookup,nowhere"], "strip_domain", "nowhere"),
    (["--lower_case", "all,2"], "lower_case", "'2'"),
    (["--query_key", "\\u\\x"], "query_key", "\\x"),
    (["--debug=maybe"], "debug", "maybe"),
    (["--login_failure_limit", "5"], "login_failure_limit", "COUNT/SECONDS"),
    (["--login_failure_limit", "0/60"], "login_failure_limit", "'0/60'"),
    (["--login_failure_limit", "5/-1"], "login_failure_limit", "'5/-1'"),
    (["--auth_failure_delay", "1.5"], "auth_failure_delay", "1.5"),
    (["--proxy_protocol", "10.0.0.0/33"], "proxy_protocol", "10.0.0.0/33"),
])
def test_bad_value_names_the_option(args, option, reason):
    with pytest.raises(perdition.OptionError) as error:
        config(*args)
    assert "--" + option in str(error.value)
    assert reason in str(error.value)


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option --bogus"),
    (["-Z"], "unknown option -Z"),
    (["-dZ"], "unknown option -Z"),
    (["--l", "110"], "unknown option --l"),
    (["stray"], "unexpected argument 'stray'"),
    (["-l"], "option -l needs PORT_NUMBER|PORT_NAME"),
    (["--outgoing_server"], "option --outgoing_server needs SERVER"),
])
def test_unknown_option_or_missing_argument(args, message):
    with pytest.raises(perdition.OptionError, match=message.replace(
            "|", "\\|")):
        config(*args)


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "perdition: unknown option --bogus"),
    (["-l", "70000"], "perdition: option -l, --listen_port: port 70000 is "
                      "out of range"),
])
def test_command_line_error_stops_start_up(tmp_path, args, message):
    result = run_perdition(["--no_daemon", "-F", "+", "-M", "", *args],
                           tmpdir=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_option_with_its_default(flag):
    """Run with this process's environment, so that the defaults under
    the sysconfdir are the ones perdition.OPTIONS holds here."""
    result = subprocess.run([sys.executable, PERDITION, flag],
                            capture_output=True, text=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    for option in perdition.OPTIONS:
        head = option.names + (" " + option.arg if option.arg else "") + ":"
        assert head in lines
        text = lines[lines.index(head) + 1]
        if option.arg is None:
            assert text.endswith("(default off)"), text
        elif option.default is None:    # depends on the protocol
            assert "default" in text, text
        else:
            assert text.endswith('(default "%s")' % option.default), text


def test_help_shows_defaults_under_the_sysconfdir(tmp_path):
    result = run_perdition(["--help"], tmpdir=tmp_path)
    assert result.returncode == 0
    expected = os.path.join(tmp_path, "etc", "perdition.crt.pem")
    assert '(default "%s")' % expected in result.stdout


# ---------------------------------------------------------------------------
# The configuration file
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("option", [o for o in SAMPLED if o.long not in
                                    perdition.NOT_IN_CONFIG_FILE],
                         ids=lambda o: o.long)
def test_every_option_as_a_configuration_file_key(tmp_path, option):
    raw, expected = SAMPLES[option.long]
    for key in filter(None, (option.short, option.long) + option.aliases):
        line = key if raw is None else "%s %s" % (key, conf_escape(raw))
        conf = write_conf(tmp_path / "perdition.conf", line + "\n")
        assert getattr(config("-f", conf), option.long) == expected, line


def test_help_and_config_file_keys_are_ignored_in_the_file(tmp_path):
    conf = write_conf(tmp_path / "perdition.conf",
                      "h\nhelp\nf /nonexistent\nconfig_file /nonexistent\n"
                      "l 1143\n")
    parsed = config("-f", conf)
    assert not parsed.help
    assert (parsed.config_file, parsed.listen_port) == (conf, 1143)


def entries(tmp_path, text):
    return perdition.read_config_file(write_conf(tmp_path / "p.conf", text))


def test_the_manuals_example(tmp_path):
    assert entries(tmp_path, """\
 # perdition.conf
 l           110             #Short option used as key
 group       mail            #Long option used as key
 a                           #Option with no argument
""") == [(2, "l", "110"), (3, "group", "mail"), (4, "a", None)]


@pytest.mark.parametrize("text, key, value", [
    # whitespace: around key and value dropped, inside the value kept
    ("\t ok_line \t You  are\tso in \t # comment", "ok_line",
     "You  are\tso in"),
    # a hash starts a comment, unless escaped
    ("ok_line a#b", "ok_line", "a"),
    (r"domain_delimiter \#", "domain_delimiter", "#"),
    # a backslash makes any character literal, and itself vanishes
    (r"""ok_line a\\b\ c\'d\"e\x""", "ok_line", """a\\b c'd"ex"""),
    (r"ok\ line x", "ok line", "x"),
    # a backslash before the newline joins the lines
    ("ok_line You are \\\n  so in", "ok_line", "You are   so in"),
    # ... wherever it stands, inside quotes too, as the C perdition reads it
    ('ok_line "From the \\\nfile"', "ok_line", "From the file"),
    ("ok_line 'From the \\\nfile'", "ok_line", "From the file"),
    ('ok_line "a \'b \\\nc\' d"', "ok_line", "a b c d"),
    # single quotes: all literal
    ("""ok_line 'a # b \\ c "d"'""", "ok_line", """a # b \\ c "d\""""),
    ("'ok line' x", "ok line", "x"),
    # double quotes: all literal but a single quote, which quotes within
    # ("Anything other than a (') inside double quotes ... literal")
    ("""ok_line "a # b \\ c" """, "ok_line", "a # b \\ c"),
    ("""ok_line "x'y"z'w" """, "ok_line", 'xy"zw'),
    ('"ok_line" "x"', "ok_line", "x"),
    ("""ok_line pre"mid  dle"'post #'""", "ok_line", "premid  dlepost #"),
    # a quoted empty string is an empty value, not a flag
    ('map_library ""', "map_library", ""),
    ("map_library ''", "map_library", ""),
    # a key alone is a flag
    ("debug   # on", "debug", None),
])
def test_configuration_file_syntax(tmp_path, text, key, value):
    assert entries(tmp_path, text + "\n") == [(1, key, value)]


def test_blank_lines_comments_and_line_numbers(tmp_path):
    assert entries(tmp_path, """\

# a comment
   # an indented comment

ok_line one \\
two
l 110
""") == [(5, "ok_line", "one two"), (7, "l", "110")]


def test_a_comment_ending_in_a_backslash_continues(tmp_path):
    """The Debian sample /etc/perdition/perdition.conf relies on it: a
    commented-out option's continuation lines are comment too."""
    assert entries(tmp_path, r'''# i|inetd_mode:
#managesieve_capability \
"\"IMPLEMENTATION\" \"perdition\"  "\
"\"SIEVE\" \"comparator-i;octet "\
"copy i"\
"nclude "\
"\"VERSION\" \"1.18\""

# L|connection_limit LIMIT:
L 64
''') == [(10, "L", "64")]


def test_configuration_file_without_final_newline(tmp_path):
    assert entries(tmp_path, "l 110\ndebug") == [(1, "l", "110"),
                                                   (2, "debug", None)]


@pytest.mark.parametrize("text, line, reason", [
    ("l 110\nbogus 1\n", 2, "unknown option 'bogus'"),
    ("listen_port 70000\n", 1, "listen_port: port 70000 is out of range"),
    ("# c \\\n c\nok_line a \\\nb\n\nd maybe\n", 6, "d: takes no value"),
    ("listen_port\n", 1, "listen_port: needs PORT"),
    ("ok_line 'unterminated\n", 1, "unterminated quote"),
    ("log_passwd sometimes\n", 1, "log_passwd: must be one of"),
    ("ok\\ line x\n", 1, "unknown option 'ok line'"),
])
def test_bad_configuration_line_names_file_and_line(tmp_path, text, line,
                                                    reason):
    conf = write_conf(tmp_path / "bad.conf", text)
    with pytest.raises(perdition.OptionError) as error:
        config("-f", conf)
    assert str(error.value).startswith("%s:%d: " % (conf, line))
    assert reason in str(error.value)


@pytest.mark.parametrize("key", ["ok_line", "capability", "imap_capability",
                                 "domain_delimiter", "explicit_domain"])
@pytest.mark.parametrize("value, character", [
    ('"one\ntwo"', "'\\n'"), ("'one\x1btwo'", "'\\x1b'"),
    ("'a\x01b'", "'\\x01'"), ("'a\x7fb'", "'\\x7f'"),
    ("'a\u2028b'", "'\\u2028'"), ("'a\x85b'", "'\\x85'"),
])
def test_a_value_sent_on_the_wire_is_one_line(tmp_path, key, value,
                                              character):
    """A newline inside ok_line would split the reply in two."""
    conf = write_conf(tmp_path / "wire.conf", "# wire\n%s %s\n" % (key, value))
    with pytest.raises(perdition.OptionError) as error:
        config("-f", conf)
    assert str(error.value).startswith("%s:2: %s: holds the unprintable "
                                       "character %s" % (conf, key,
                                                         character))


def test_a_tab_is_text_on_the_wire(tmp_path):
    conf = write_conf(tmp_path / "tab.conf", "ok_line 'so\tin'\n")
    assert config("-f", conf).ok_line == "so\tin"


def test_a_control_character_on_the_command_line_stops_start_up(tmp_path):
    result = run_perdition(["--no_daemon", "-F", "+", "-M", "",
                            "-O", "in\r\n* BYE"], tmpdir=tmp_path)
    assert result.returncode == 1
    assert "option -O, --ok_line: holds the unprintable character '\\r'" \
        in result.stderr


def test_bad_configuration_file_stops_start_up(tmp_path):
    conf = write_conf(tmp_path / "bad.conf", "# fine\nl 110\nl 0\n")
    result = run_perdition(["--no_daemon", "-F", "+", "-M", "", "-f", conf],
                           tmpdir=tmp_path)
    assert result.returncode != 0
    assert "%s:3: l: port 0 is out of range" % conf in result.stderr


def test_missing_configuration_file_is_an_error(tmp_path):
    missing = str(tmp_path / "missing.conf")
    with pytest.raises(perdition.OptionError, match=missing):
        config("-f", missing)


def test_command_line_beats_the_file(tmp_path):
    conf = write_conf(tmp_path / "perdition.conf",
                      "l 1000\nO from the file\nP IMAP4\nlog_passwd ok\n"
                      "L 5\n")
    parsed = config("-f", conf, "-l", "2000", "-P", "pop3", "-L", "0")
    assert (parsed.listen_port, parsed.protocol, parsed.connection_limit) \
        == (2000, "POP3", 0)
    assert (parsed.ok_line, parsed.log_passwd) == ("from the file", "ok")
    assert parsed.capability == "UIDL  USER"


def test_protocol_from_the_file_sets_protocol_defaults(tmp_path):
    conf = write_conf(tmp_path / "perdition.conf", "protocol imap4s\n")
    parsed = config("-f", conf, program="/usr/sbin/perdition.pop3")
    assert (parsed.protocol, parsed.listen_port, parsed.capability) == \
        ("IMAP4S", 993, "IMAP4 IMAP4REV1")


def test_default_configuration_file_search(sysconfdir):
    """<basename>.conf, then perdition.<protocol>.conf, then
    perdition.conf, then none."""
    names = ["perdition.imaps.conf", "perdition.imap4s.conf",
             "perdition.conf"]
    for name in names:
        write_conf(sysconfdir / name, "ok_line from %s\n" % name)
    for name in names:
        parsed = config(program="/usr/sbin/perdition.imaps")
        assert parsed.config_file == str(sysconfdir / name)
        assert parsed.ok_line == "from " + name
        (sysconfdir / name).unlink()
    parsed = config(program="/usr/sbin/perdition.imaps")
    assert (parsed.config_file, parsed.ok_line) == ("", "You are so in")


def test_protocol_configuration_file_follows_dash_p(sysconfdir):
    for name in ("pop3", "imap4"):
        write_conf(sysconfdir / ("perdition.%s.conf" % name),
                   "ok_line %s\n" % name)
    assert config("-P", "IMAP4").ok_line == "imap4"
    assert config().ok_line == "pop3"


def test_explicit_configuration_file_replaces_the_search(sysconfdir,
                                                          tmp_path):
    write_conf(sysconfdir / "perdition.conf", "bogus\n")
    other = write_conf(tmp_path / "other.conf", "ok_line other\n")
    assert config("-f", other).ok_line == "other"
    assert config("-f", "").config_file == ""


def test_sysconfdir_comes_from_the_environment(tmp_path):
    conf = write_conf(tmp_path / "etc" / "perdition.conf",
                      "# the default file\nno_such_option\n")
    result = run_perdition(["--no_daemon", "-F", "+", "-M", ""],
                           tmpdir=tmp_path)
    assert result.returncode != 0
    assert "%s:2: unknown option 'no_such_option'" % conf in result.stderr


# ---------------------------------------------------------------------------
# The program's name, python3 -m perdition
# ---------------------------------------------------------------------------

PROGRAM_NAMES = [("perdition.pop3", "POP3", 110),
                 ("perdition.pop3s", "POP3S", 995),
                 ("perdition.imap4", "IMAP4", 143),
                 ("perdition.imap4s", "IMAP4S", 993),
                 ("perdition.imaps", "IMAP4S", 993),
                 ("perdition", "POP3", 110)]


@pytest.mark.parametrize("name, protocol, port", PROGRAM_NAMES)
def test_program_name_picks_the_protocol(name, protocol, port):
    parsed = config(program="/usr/sbin/" + name)
    assert (parsed.basename, parsed.protocol, parsed.listen_port,
            parsed.outgoing_port) == (name, protocol, port, port)
    assert parsed.pid_file == os.path.join(perdition.VAR_STATE_DIR, name,
                                           name + ".pid")
    overridden = config("-P", "imap4", program="/usr/sbin/" + name)
    assert (overridden.protocol, overridden.listen_port) == ("IMAP4", 143)


def started_as(command, tmp_path, args, backend_port):
    """A Perdition run as *command* (a symlink, or python3 -m perdition)
    rather than as ``python3 perdition.py -P PROTOCOL``."""
    proxy = Perdition(args, tmpdir=tmp_path, backend_port=backend_port)
    assert proxy.args[:3] == [sys.executable, PERDITION, "-P"]
    proxy.args[:4] = command
    return proxy


def log_in(protocol, port, tls_context):
    """Log in as alice through perdition on *port*; return its answer."""
    if protocol.startswith("POP3"):
        client = poplib.POP3_SSL("127.0.0.1", port, context=tls_context,
                                 timeout=TIMEOUT) if tls_context \
            else pop3_connect(port)
        try:
            assert client.getwelcome().startswith(b"+OK POP3 Ready ")
            client.user("alice")
            answer = client.pass_("alicepw")
            client.stat()
        finally:
            client.quit()
        return answer.decode()
    client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=tls_context,
                               timeout=TIMEOUT) if tls_context \
        else imap_connect(port)
    try:
        assert client.welcome.startswith(b"* OK IMAP4 Ready ")
        answer = client.login("alice", "alicepw")
        assert client.select("INBOX")[0] == "OK"
    finally:
        client.logout()
    return "%s %s" % (answer[0], answer[1][0].decode())


@pytest.mark.parametrize("name, protocol, port", PROGRAM_NAMES[:-1])
def test_run_through_a_symlink(tmp_path, dovecot, name, protocol, port):
    """The symlink's name picks the protocol: the greeting, a login through
    Dovecot, and the default port it tries to listen on."""
    link = tmp_path / name
    link.symlink_to(PERDITION)
    command = [sys.executable, str(link)]
    tls = ["--ssl_cert_file", dovecot.cert_file,
           "--ssl_key_file", dovecot.key_file,
           "--ssl_ca_file", dovecot.cert_file]
    # Port 110 and friends may be taken: an address no interface has
    # makes the bind fail, and the message names the port it tried.
    result = subprocess.run(command + ["--no_daemon", "-F", "+", "-M", "",
                                       "-b", "192.0.2.1"] + tls,
                            capture_output=True, text=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL,
                            env=perdition_env(str(tmp_path)))
    assert result.returncode != 0
    assert "192.0.2.1 port %d" % port in result.stderr
    backend = {"POP3": dovecot.pop3_port, "POP3S": dovecot.pop3s_port,
               "IMAP4": dovecot.imap_port, "IMAP4S": dovecot.imaps_port}
    context = None
    if protocol.endswith("S"):
        context = ssl.create_default_context(cafile=dovecot.cert_file)
    with started_as(command, tmp_path, tls, backend[protocol]) as proxy:
        answer = log_in(protocol, proxy.port, context)
    assert answer == ("OK You are so in" if protocol.startswith("IMAP")
                      else "+OK You are so in")


def test_dash_p_overrides_the_program_name(tmp_path, dovecot):
    link = tmp_path / "perdition.pop3s"
    link.symlink_to(PERDITION)
    command = [sys.executable, str(link), "-P", "imap4"]
    with started_as(command, tmp_path, [], dovecot.imap_port) as proxy:
        assert log_in("IMAP4", proxy.port, None) == "OK You are so in"


def test_python_dash_m_perdition(tmp_path, dovecot, monkeypatch):
    monkeypatch.chdir(MAIN)
    command = [sys.executable, "-m", "perdition", "-P", "IMAP4"]
    with started_as(command, tmp_path, [], dovecot.imap_port) as proxy:
        assert log_in("IMAP4", proxy.port, None) == "OK You are so in"
    assert "Auth: 127.0.0.1 user=\"alice\"" in proxy.log()


# ---------------------------------------------------------------------------
# What perdition says when it cannot start
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["-M", "/nonexistent/mymap.py"],
     "--map_library /nonexistent/mymap.py: /nonexistent/mymap.py: "
     "No such file"),
    (["-M", "posix_regex", "-m", "/nonexistent/popmap.re"],
     "--map_library posix_regex: /nonexistent/popmap.re: No such file"),
    (["-M", "/usr/lib/libperditiondb_nosuch.so.0"],
     "unknown map library 'nosuch'"),
    (["-P", "POP3S"], "--ssl_cert_file: "),
    (["-u", "nosuchuser"], "--username: unknown user 'nosuchuser'"),
    (["-g", "nosuchgroup"], "--group: unknown group 'nosuchgroup'"),
    (["-F", "/nonexistent/dir/log"],
     "--log_facility: /nonexistent/dir/log: No such file"),
    (["-b", "192.0.2.1"], "cannot listen on 192.0.2.1 port"),
    (["-i"], "--inetd_mode: standard input is not a connected stream "
             "socket"),
])
def test_start_up_error_message(tmp_path, args, message):
    result = run_perdition(["--no_daemon", "-F", "+", "-M", "",
                            "-l", free_port(), *args], tmpdir=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("perdition: ")
    assert message in result.stderr


def test_port_in_use_is_a_start_up_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_perdition(["--no_daemon", "-F", "+", "-M", "",
                                "-b", "127.0.0.1", "-l", port],
                               tmpdir=tmp_path)
    assert result.returncode != 0
    assert "cannot listen on 127.0.0.1 port %d" % port in result.stderr
    assert "in use" in result.stderr
