"""Logging (issue 2, item 5): the Connect, Auth and Close lines that POP and
IMAP before SMTP rely on, passwords kept out of the log, user-supplied text
that cannot forge a line, -d, -C, -q, start-up parameters, and the four
destinations of -F: syslog, a file, stdout and stderr.
"""

import imaplib
import os
import poplib
import re
import signal
import socket
import sys
import time

import pytest

from dovecot import free_port
from helpers import (PERDITION, Perdition, RawClient, TIMEOUT, imap_connect,
                     pop3_connect, run_perdition, wait_until)
from support import traversable, wait_for_eof

sys.path.insert(0, os.path.dirname(PERDITION))
import perdition  # noqa: E402

PREFIX = r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d perdition\[%s\]: "
# The lines a session logs at the default level.
SESSION_LINES = ("Connect: ", "Auth: ", "Close: ")


def messages(text, pid=None):
    """The messages of a log text, each line checked for the prefix that
    syslog would add (with *pid*, or any): a line without it would be a
    forged one."""
    prefix = re.compile(PREFIX % (r"\d+" if pid is None else pid))
    found = []
    for line in text.splitlines():
        match = prefix.match(line)
        assert match, "line without the log prefix: %r" % line
        found.append(line[match.end():])
    return found


def new_messages(proxy, offset):
    """The messages logged after *offset*, once a session has logged its
    Close line there."""
    wait_until(lambda: " Close: " in proxy.log()[offset:], what="Close line")
    return messages(proxy.log()[offset:], proxy.pid)


def start(proxy):
    """Start *proxy* and wait until its readiness probe has been logged,
    so that what follows in the log is the tests' own."""
    proxy.start()
    proxy.wait_for_log('Close: 127.0.0.1 user="" received=0 sent=0\n')
    return proxy


@pytest.fixture(scope="module")
def proxies(dovecot, tmp_path_factory):
    """One POP3 and one IMAP4 perdition with the default logging options."""
    tmp = tmp_path_factory.mktemp("proxies")
    running = {
        "IMAP4": start(Perdition([], "IMAP4", tmp, dovecot.imap_port)),
        "POP3": start(Perdition([], "POP3", tmp, dovecot.pop3_port))}
    yield running
    for proxy in running.values():
        proxy.stop()


def backend_port(dovecot, protocol):
    return dovecot.imap_port if protocol == "IMAP4" else dovecot.pop3_port


def log_in_raw(client, protocol, user, password):
    """Log in over a RawClient that has read the greeting; return the
    line perdition answered the password with."""
    if protocol == "IMAP4":
        client.send(b"a LOGIN %s %s\r\n" % (user, password))
    else:
        client.send(b"USER %s\r\n" % user)
        assert client.readline().startswith(b"+OK")
        client.send(b"PASS %s\r\n" % password)
    return client.readline()


# ---------------------------------------------------------------------------
# Connect, Auth, Close
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_connect_auth_close_lines(proxies, dovecot, protocol):
    """Exactly three lines per session, as the manual gives them; received
    and sent count the bytes proxied after the login, each way."""
    proxy = proxies[protocol]
    offset = len(proxy.log())
    with RawClient(proxy.port) as client:
        client.readline()
        assert log_in_raw(client, protocol, b"user7", b"pw7").endswith(
            b"OK You are so in\r\n")
        commands = b"b NOOP\r\nc LOGOUT\r\n" if protocol == "IMAP4" \
            else b"STAT\r\nQUIT\r\n"
        client.send(commands)
        answers = wait_for_eof(client)
    assert answers.endswith(b"\r\n") and len(answers) > 20
    assert new_messages(proxy, offset) == [
        "Connect: 127.0.0.1",
        'Auth: 127.0.0.1 user="user7" passwd="XXXXXX" server="127.0.0.1" '
        'port="%d" status=ok' % backend_port(dovecot, protocol),
        'Close: 127.0.0.1 user="user7" received=%d sent=%d'
        % (len(commands), len(answers))]


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_failed_login_then_good_one(proxies, dovecot, protocol):
    proxy = proxies[protocol]
    offset = len(proxy.log())
    with RawClient(proxy.port) as client:
        client.readline()
        assert b"OK" not in log_in_raw(client, protocol, b"user8", b"nope")
        assert log_in_raw(client, protocol, b"user8", b"pw8").endswith(
            b"OK You are so in\r\n")
    lines = new_messages(proxy, offset)
    assert len(lines) == 4
    assert re.fullmatch(
        'Auth: 127.0.0.1 user="user8" passwd="XXXXXX" server="127.0.0.1" '
        'port="%d" status=failed: .*Authentication failed.*'
        % backend_port(dovecot, protocol), lines[1])
    assert lines[2].endswith('user="user8" passwd="XXXXXX" server='
                             '"127.0.0.1" port="%d" status=ok'
                             % backend_port(dovecot, protocol))
    assert re.fullmatch(r'Close: 127.0.0.1 user="user8" received=\d+ '
                        r'sent=\d+', lines[3])


def test_session_without_login(proxies):
    proxy = proxies["IMAP4"]
    offset = len(proxy.log())
    with RawClient(proxy.port) as client:
        client.readline()
        client.send(b"a LOGIN alice wrong\r\n")
        assert client.readline().startswith(b"a NO ")
        client.send(b"b LOGOUT\r\n")
        wait_for_eof(client)
    lines = new_messages(proxy, offset)
    assert lines[0] == "Connect: 127.0.0.1"
    assert lines[1].startswith('Auth: 127.0.0.1 user="alice" '
                               'passwd="XXXXXX"')
    assert lines[2] == 'Close: 127.0.0.1 user="alice" received=0 sent=0'


def test_unreachable_server_is_the_reason(tmp_path):
    closed = free_port()
    proxy = start(Perdition([], "POP3", tmp_path, closed))
    try:
        client = pop3_connect(proxy.port)
        client.user("alice")
        with pytest.raises(poplib.error_proto):
            client.pass_("alicepw")
        client.quit()
        text = proxy.wait_for_log(" Close: 127.0.0.1 user=\"alice\"")
    finally:
        proxy.stop()
    assert re.search(r'Auth: 127\.0\.0\.1 user="alice" passwd="XXXXXX" '
                     r'server="127\.0\.0\.1" port="%d" status=failed: '
                     r'Could not connect to 127\.0\.0\.1:%d: .*refused'
                     % (closed, closed), text)


def test_password_absent_from_the_log_by_default(proxies):
    for protocol, proxy in proxies.items():
        offset = len(proxy.log())
        with RawClient(proxy.port) as client:
            client.readline()
            log_in_raw(client, protocol, b"bob", b"secret-wrong-%s"
                       % protocol.encode())
            log_in_raw(client, protocol, b"bob", b"bobpw")
        new_messages(proxy, offset)
        text = proxy.log()
        assert "secret-wrong" not in text and "bobpw" not in text
        assert 'user="bob" passwd="XXXXXX"' in text


@pytest.mark.parametrize("mode, shows_failed, shows_ok", [
    ("never", False, False), ("fail", True, False), ("ok", False, True),
    ("always", True, True)])
def test_log_passwd(tmp_path, dovecot, mode, shows_failed, shows_ok):
    proxy = start(Perdition(["--log_passwd", mode], "IMAP4", tmp_path,
                            dovecot.imap_port))
    wrong = 'wr"ong-%s' % mode
    try:
        imap = imap_connect(proxy.port)
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("alice", wrong)
        imap.login("alice", "alicepw")
        imap.logout()
        text = proxy.wait_for_log(" Close: 127.0.0.1 user=\"alice\"")
    finally:
        proxy.stop()
    assert ('passwd="wr\\"ong-%s" server=' % mode in text) == shows_failed
    assert ('passwd="alicepw" server=' in text) == shows_ok
    # Nowhere else either: the whole file.
    assert text.count("ong-" + mode) == shows_failed
    assert text.count("alicepw") == shows_ok


def test_user_name_cannot_forge_a_log_line(proxies):
    """CR, LF, quotes, backslashes and escape sequences in a user name
    are escaped: the log keeps one line per message and each field ends
    where it should."""
    forged = b'x\r\nAuth: 6.6.6.6 user="root" status=ok\x1b[2J\\'
    escaped = 'x\\x0d\\x0aAuth: 6.6.6.6 user=\\"root\\" status=ok' \
              '\\x1b[2J\\\\'
    proxy = proxies["IMAP4"]
    offset = len(proxy.log())
    with RawClient(proxy.port) as client:
        client.readline()
        client.send(b"a LOGIN {%d}\r\n" % len(forged))
        assert client.readline().startswith(b"+ ")
        client.send(forged + b" secret\r\n")
        assert client.readline().startswith(b"a NO ")
    lines = new_messages(proxy, offset)
    assert lines[1].startswith('Auth: 127.0.0.1 user="%s" passwd="XXXXXX" '
                               'server=' % escaped)
    assert lines[2] == 'Close: 127.0.0.1 user="%s" received=0 sent=0' \
        % escaped
    assert len(lines) == 3


@pytest.mark.parametrize("character, escaped", [
    ("\u2028", "\\u2028"), ("\u2029", "\\u2029"), ("\x85", "\\x85"),
    ("\u200e", "\\u200e"), ("\U000e0001", "\\U000e0001"),
])
def test_unicode_line_breaks_in_a_user_name_are_escaped(
        proxies, character, escaped):
    """Some log viewers break lines at U+2028, U+2029 or NEL: every
    character that is not printable is escaped, not only C0 and C1."""
    forged = ("x%sAuth: 6.6.6.6 user=root status=ok" % character).encode()
    proxy = proxies["IMAP4"]
    offset = len(proxy.log())
    with RawClient(proxy.port) as client:
        client.readline()
        client.send(b"a LOGIN {%d+}\r\n%s secret\r\n" % (len(forged),
                                                         forged))
        assert client.readline().startswith(b"a NO ")
    lines = new_messages(proxy, offset)
    assert lines[1].startswith(
        'Auth: 127.0.0.1 user="x%sAuth: 6.6.6.6 user=root status=ok" '
        'passwd="XXXXXX" server=' % escaped)
    assert character not in proxy.log()


def test_pop3_user_with_carriage_return(proxies):
    proxy = proxies["POP3"]
    offset = len(proxy.log())
    with RawClient(proxy.port) as client:
        client.readline()
        client.send(b'USER a\rClose: 6.6.6.6 user="b"\r\n')
        client.readline()
        client.send(b"PASS secret\r\n")
        assert client.readline().startswith(b"-ERR")
    lines = new_messages(proxy, offset)
    assert lines[2] == \
        'Close: 127.0.0.1 user="a\\x0dClose: 6.6.6.6 user=\\"b\\"" ' \
        'received=0 sent=0'


# ---------------------------------------------------------------------------
# Levels: -d, -C, -q, start-up parameters
# ---------------------------------------------------------------------------

def logged_dialogue(tmp_path, dovecot, protocol, args):
    """Log in as alice through a perdition run with `args`: (log text,
    the messages of the log)."""
    proxy = start(Perdition(args, protocol, tmp_path,
                            backend_port(dovecot, protocol)))
    try:
        with RawClient(proxy.port) as client:
            client.readline()
            assert log_in_raw(client, protocol, b"alice", b"alicepw") \
                .endswith(b"OK You are so in\r\n")
        text = proxy.wait_for_log(' Close: 127.0.0.1 user="alice"')
    finally:
        proxy.stop()
    return text, messages(text, proxy.pid)


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_debug_connection_logging_masks_the_password(tmp_path, dovecot,
                                                     protocol):
    text, lines = logged_dialogue(tmp_path, dovecot, protocol, ["-d", "-C"])
    dialogue = [line for line in lines if not line.startswith(
        SESSION_LINES + ("Starting: ", "Listening on "))]
    # perdition's greeting and answer, the client's and the server's words
    assert any("%s Ready " % protocol in line for line in dialogue)
    assert any(line.endswith("OK You are so in") for line in dialogue)
    assert any("Dovecot" in line for line in dialogue)
    secret = "LOGIN XXXXXX" if protocol == "IMAP4" else "PASS XXXXXX"
    assert sum(secret in line for line in dialogue) >= 2    # both sides
    assert "alicepw" not in text


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_connection_logging_shows_the_password_with_log_passwd_always(
        tmp_path, dovecot, protocol):
    text, lines = logged_dialogue(tmp_path, dovecot, protocol,
                                  ["-d", "-C", "--log_passwd", "always"])
    dialogue = [line for line in lines
                if "alicepw" in line and not line.startswith(SESSION_LINES)]
    assert len(dialogue) >= 2       # the client's words and the server's
    assert "XXXXXX" not in text


@pytest.mark.parametrize("args", [["-C"], ["-d"]])
def test_connection_logging_needs_debug(tmp_path, dovecot, args):
    """-C alone logs nothing extra; -d alone logs debugging messages but
    not the dialogue."""
    proxy = start(Perdition(args, "IMAP4", tmp_path, dovecot.imap_port))
    offset = len(proxy.log())
    try:
        imap = imap_connect(proxy.port)
        imap.login("alice", "alicepw")
        imap.logout()
        lines = new_messages(proxy, offset)
    finally:
        proxy.stop()
    if args == ["-C"]:
        assert [line.split(":")[0] for line in lines] == \
            ["Connect", "Auth", "Close"]
    assert not any("Dovecot" in line or "You are so in" in line or
                   "LOGIN" in line for line in lines)


def test_startup_parameters_are_logged(proxies, dovecot):
    proxy = proxies["IMAP4"]
    starting = [line for line in messages(proxy.log(), proxy.pid)
                if line.startswith("Starting: ")]
    assert len(starting) == 1
    for option in perdition.OPTIONS:
        if option.long != "help":
            assert " %s=" % option.long in starting[0]
    assert "listen_port=%d," % proxy.port in starting[0]
    assert "outgoing_server=127.0.0.1:%d," % dovecot.imap_port \
        in starting[0]
    assert 'protocol="IMAP4"' in starting[0]


def test_quiet_logs_only_errors(tmp_path, dovecot):
    """-q: no start-up parameters, no session lines; an error at run time
    (a popmap that no longer reads on SIGHUP) is still logged."""
    traversable(tmp_path)       # the log, seen again as nobody on SIGHUP
    popmap = tmp_path / "popmap.re"
    popmap.write_text(".* 127.0.0.1:%d\n" % dovecot.imap_port)
    proxy = Perdition(["-q", "-M", "posix_regex", "-m", popmap], "IMAP4",
                      tmp_path, dovecot.imap_port)
    with proxy:
        imap = imap_connect(proxy.port)
        imap.login("alice", "alicepw")
        imap.logout()
        popmap.write_text("(unbalanced 127.0.0.1\n")
        proxy.proc.send_signal(signal.SIGHUP)   # read the popmap again
        text = proxy.wait_for_log("Reload failed, keeping generation 1")
    assert len(messages(text, proxy.pid)) == 1


def test_quiet_still_logs_fatal_errors(tmp_path):
    log = tmp_path / "fatal.log"
    result = run_perdition(["-q", "--no_daemon", "-F", log, "-M", "",
                            "-l", free_port(), "-u", "nosuchuser"],
                           tmpdir=tmp_path)
    assert result.returncode != 0
    lines = messages(log.read_text())
    assert lines == ["Fatal error: option -u, --username: unknown user "
                     "'nosuchuser'"]


def test_debug_overrides_quiet(tmp_path, dovecot):
    proxy = start(Perdition(["-q", "-d"], "IMAP4", tmp_path,
                            dovecot.imap_port))
    proxy.stop()
    text = proxy.log()
    assert "Starting: " in text and "Connect: 127.0.0.1" in text


# ---------------------------------------------------------------------------
# Destinations
# ---------------------------------------------------------------------------

def test_log_file_is_appended_to(tmp_path, dovecot):
    proxy = Perdition([], "POP3", tmp_path, dovecot.pop3_port)
    with open(proxy.log_file, "w") as f:
        f.write("an earlier line\n")
    start(proxy)
    proxy.stop()
    text = proxy.log()
    assert text.startswith("an earlier line\n")
    messages(text.split("\n", 1)[1], proxy.pid)


@pytest.mark.parametrize("facility", ["-", "+"])
def test_log_to_stdout_or_stderr(tmp_path, dovecot, facility):
    proxy = Perdition(["-F", facility], "POP3", tmp_path, dovecot.pop3_port)
    output = proxy.stdout if facility == "-" else proxy.stderr
    with proxy:
        client = pop3_connect(proxy.port)
        client.user("alice")
        client.pass_("alicepw")
        client.quit()
        wait_until(lambda: 'Close: 127.0.0.1 user="alice"' in output(),
                   what="Close line")
    lines = messages(output(), proxy.pid)
    assert any(line.startswith('Auth: 127.0.0.1 user="alice"')
               for line in lines)
    assert (proxy.stderr() if facility == "-" else proxy.stdout()) == ""
    assert not os.path.exists(proxy.log_file)


@pytest.fixture
def dev_log():
    """A datagram socket at /dev/log standing in for syslogd, for the
    duration of one test.  The machine's own /dev/log is never touched."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("/dev/log")
    except OSError as e:
        sock.close()
        pytest.skip("/dev/log is in use (%s): cannot stand in for syslogd"
                    % e.strerror)
    try:
        os.chmod("/dev/log", 0o666)     # perdition logs as nobody
        sock.settimeout(TIMEOUT)
        yield sock
    finally:
        sock.close()
        os.unlink("/dev/log")


def syslog_messages(sock, until, pid=None):
    """(priority, ident, message) of the datagrams from perdition (process
    *pid* if given), up to and including the first message containing
    *until*."""
    found = []
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        datagram = sock.recv(65536).decode("utf-8", "replace")
        match = re.fullmatch(r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d "
                             r"(perdition)\[(\d+)\]: (.*)", datagram, re.S)
        if match and pid in (None, int(match.group(3))):
            found.append((int(match.group(1)), match.group(2),
                          match.group(4)))
            if until in match.group(4):
                return found
    raise AssertionError("no %r from syslog in time: %s" % (until, found))


def test_syslog_default_facility_is_mail(tmp_path, dovecot, dev_log):
    proxy = Perdition([], "IMAP4", tmp_path, dovecot.imap_port)
    where = proxy.args.index("-F")
    del proxy.args[where:where + 2]
    with proxy:
        imap = imap_connect(proxy.port)
        imap.login("alice", "alicepw")
        imap.logout()
        found = syslog_messages(dev_log, 'Close: 127.0.0.1 user="alice"',
                                proxy.pid)
    info = 2 * 8 + 6                    # LOG_MAIL | LOG_INFO
    assert ("Starting: " in found[0][2]) and found[0][:2] == \
        (info, "perdition")
    assert (info, "perdition",
            'Auth: 127.0.0.1 user="alice" passwd="XXXXXX" server="127.0.0.1" '
            'port="%d" status=ok' % dovecot.imap_port) in found
    assert not os.path.exists(proxy.log_file)


def test_syslog_facility_and_error_priority(tmp_path, dev_log):
    result = run_perdition(["--no_daemon", "-F", "local3", "-M", "",
                            "-l", free_port(), "-u", "nosuchuser"],
                           tmpdir=tmp_path)
    assert result.returncode != 0
    found = syslog_messages(dev_log, "Fatal error")
    error = 19 * 8 + 3                  # LOG_LOCAL3 | LOG_ERR
    assert found == [(error, "perdition", "Fatal error: option -u, "
                      "--username: unknown user 'nosuchuser'")]


def test_unknown_syslog_facility_is_a_start_up_error(tmp_path):
    result = run_perdition(["--no_daemon", "-F", "mial", "-M", "",
                            "-l", free_port()], tmpdir=tmp_path)
    assert result.returncode != 0
    assert "option -F, --log_facility: unknown syslog facility 'mial'" \
        in result.stderr


def test_connect_relog(tmp_path, dovecot):
    """--connect_relog logs the Auth line of a proxied session again, for
    POP and IMAP before SMTP, and stops when the session ends."""
    proxy = start(Perdition(["--connect_relog", "1"], "IMAP4", tmp_path,
                            dovecot.imap_port))
    try:
        imap = imap_connect(proxy.port)
        imap.login("alice", "alicepw")
        auth = 'Auth: 127.0.0.1 user="alice" passwd="XXXXXX"'
        wait_until(lambda: proxy.log().count(auth) >= 3, what="relogs")
        imap.logout()
        text = proxy.wait_for_log(' Close: 127.0.0.1 user="alice"')
        time.sleep(1.5)
        assert proxy.log().count(auth) == text.count(auth)
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------
# Secrets in the -d -C dialogue
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def talkative(dovecot, tmp_path_factory):
    """perdition logging its dialogue (-d -C) in front of Dovecot; the
    tests send many malformed lines on one connection (--max_errors 0)."""
    tmp = tmp_path_factory.mktemp("talkative")
    running = {
        protocol: start(Perdition(["-d", "-C", "--max_errors", "0"],
                                  protocol, tmp,
                                  backend_port(dovecot, protocol)))
        for protocol in ("IMAP4", "POP3")}
    yield running
    for proxy in running.values():
        proxy.stop()


def dialogue_of(proxy, lines, secrets, final=None):
    """Send *lines* (each answered by one line, or by '+ ' first for a
    synchronising literal), then *final* and its answer; return the log of
    that connection, with every secret checked absent from it."""
    offset = len(proxy.log())
    with RawClient(proxy.port) as client:
        client.readline()
        for line in lines:
            client.send(line)
            answer = client.readline()
            assert answer, line
        if final:
            client.send(final)
            answers = client.read_until(b"so in\r\n")
            assert answers.endswith(b"OK You are so in\r\n"), answers
    text = "\n".join(new_messages(proxy, offset))
    for secret in secrets:
        assert secret not in text, (secret, text)
    return text


# Malformed lines that carry a password: each secret must stay out.
IMAP_CREDENTIAL_LINES = [
    b"a LOGIN alice s3cret-atom\r\n",
    b'a LOGIN "alice" "s3cret-quoted"\r\n',
    b"a login alice s3cret-lower\r\n",
    b"a LoGiN alice s3cret-mixed\r\n",
    b"a  LOGIN  alice  s3cret-doubled\r\n",
    b" a LOGIN alice s3cret-leading\r\n",
    b"a\tLOGIN\talice\ts3cret-tab\r\n",
    b"a LOGIN\talice s3cret-tab2\r\n",
    b"LOGIN alice s3cret-tagless\r\n",
    b"a LOGIN alice s3cret-extra words\r\n",
    b"a LOGIN alice {13+}\r\ns3cret-literal\r\n",
    # the verb glued to what follows it: still the verb to a reader
    b'a LOGIN"alice" "s3cret-gluedquote"\r\n',
    b"a LOGIN\x00 alice s3cret-nul\r\n",
    b"a LOGINalice s3cret-gluedatom\r\n",
    b"a login\x00alice\x00s3cret-twonuls\r\n",
    b"a AUTHENTICATE\x00PLAIN s3cret-authenticate\r\n",
]
POP3_CREDENTIAL_LINES = [
    b"PASS s3cret-first\r\n",       # before USER: refused, still masked
    b"USER alice\r\n",
    b"pass s3cret-lower\r\n",
    b"PaSs s3cret-mixed\r\n",
    b"PASS  s3cret-doubled\r\n",
    b" PASS s3cret-leading\r\n",
    b"PASS\ts3cret-tab\r\n",
    b"PASS s3cret-extra words\r\n",
    # the verb glued to what follows it
    b"PASS\x00s3cret-nul\r\n",
    b"PASSs3cret-glued\r\n",
    b"pass\x00 s3cret-spacednul\r\n",
    b"AUTH\x00PLAIN s3cret-auth\r\n",
]


def secrets_of(lines):
    return [word.decode() for line in lines
            for word in re.findall(rb"s3cret-[a-z0-9]+", line)]


def test_every_form_of_imap_login_is_masked(talkative):
    text = dialogue_of(talkative["IMAP4"], IMAP_CREDENTIAL_LINES,
                       secrets_of(IMAP_CREDENTIAL_LINES) + ["alicepw"],
                       final=b"z LOGIN alice {7+}\r\nalicepw\r\n")
    assert "client: a LOGIN XXXXXX" in text
    assert "client: a LoGiN XXXXXX" in text
    assert "client: LOGIN XXXXXX" in text
    assert "client: a AUTHENTICATE XXXXXX" in text      # glued to PLAIN
    # the real server's side: perdition's LOGIN, quoted
    assert re.search(r"to server: P\d+ LOGIN XXXXXX", text)


def test_imap_literals_towards_the_server_are_masked(talkative):
    """A password with a CR is sent to the real server as a literal: every
    line of that LOGIN is masked, and the server's go-ahead too."""
    text = dialogue_of(talkative["IMAP4"], [
        b"a LOGIN {5}\r\n", b"alice {13}\r\n", b"s3cret-\rcr-pw\r\n"], [
        "s3cret-", "cr-pw"])
    assert "to server: XXXXXX" in text and "server: + XXXXXX" in text


def test_every_form_of_pop3_pass_is_masked(talkative):
    text = dialogue_of(talkative["POP3"], POP3_CREDENTIAL_LINES,
                       secrets_of(POP3_CREDENTIAL_LINES) + ["alicepw"],
                       final=b"PASS alicepw\r\n")
    assert "client: PASS XXXXXX" in text and "client: PaSs XXXXXX" in text
    assert "client: AUTH XXXXXX" in text        # glued to PLAIN
    assert "to server: PASS XXXXXX" in text
    assert "client: USER alice" in text     # the user name is no secret
