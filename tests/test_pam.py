"""Local authentication, -a (issue 8): PAM says yes or no before any real
server is contacted.

perdition talks to the machine's real Linux-PAM with real modules, but
never through the machine's PAM configuration: each test writes a service
file of its own and names its directory with PERDITION_PAM_CONFDIR
(pam_start_confdir).  The password is checked by pam_exec running a small
script that reads it on standard input (expose_authtok) and notes the
PAM_USER and PAM_RHOST it was given; pam_echo says something on the way
(PAM_TEXT_INFO) and a failing pam_exec complains (PAM_ERROR_MSG), so each
login also walks the conversation's other paths.  Dovecot is the real
server where a login must go through; a scripted back-end shows that a
refused login reaches no server at all.
"""

import base64
import ctypes
import imaplib
import os
import poplib
import shlex
import subprocess
import sys

import pytest

from dovecot import Dovecot
from helpers import (PERDITION, Perdition, RawClient, imap_connect,
                     perdition_env, pop3_connect, wait_until)
from support import ScriptedBackend

sys.path.insert(0, os.path.dirname(PERDITION))
import perdition  # noqa: E402

# The users the check script knows, user name and password as PAM gets
# them; alice is also a Dovecot user with the same password.
PAM_USERS = {"alice": "alicepw", "erin@example.com": "erinpw"}
AUTH_FAILURE = ("status=failed: Local authentication failed: "
                "pam_authenticate: Authentication failure")
PROTOCOLS = ["IMAP4", "POP3"]

CHECK_SCRIPT = """\
#!/bin/bash
# Run by pam_exec expose_authtok: the password arrives on standard input.
IFS= read -r -d '' password
# slow waits until the test writes a line to the gate, opened before the
# script says it ran, so that the test's open() finds it open.
[ "$PAM_USER" != slow ] || exec 3<>{gate}
printf '%s %s\\n' "$PAM_USER" "$PAM_RHOST" >> {seen}
[ "$PAM_USER" != slow ] || {{ read -r -t 10 -u 3 _; exit $?; }}
case "$PAM_USER:$password" in
    {accepted}) exit 0 ;;
esac
exit 1
"""

# pam_exec succeeds, or pam_deny refuses, as in Debian's common-auth.
SERVICE = """\
auth [success=1 default=ignore] pam_exec.so expose_authtok {script}
auth requisite pam_deny.so
auth optional pam_echo.so Welcome, %u
account required {account}
"""


class PamConfig:
    """A PAM configuration directory with the 'perdition' service, and the
    script that checks passwords; all of it readable by the unprivileged
    user perdition runs as."""

    def __init__(self, directory, account="pam_permit.so"):
        Dovecot._make_traversable(str(directory))
        self.confdir = directory / "pam.d"
        self.confdir.mkdir()
        self.seen_file = directory / "seen"
        self.seen_file.touch()
        self.seen_file.chmod(0o666)
        self.gate = directory / "gate"
        os.mkfifo(self.gate, 0o666)
        os.chmod(self.gate, 0o666)
        script = directory / "check"
        script.write_text(CHECK_SCRIPT.format(
            seen=shlex.quote(str(self.seen_file)),
            gate=shlex.quote(str(self.gate)),
            accepted="|".join(shlex.quote("%s:%s" % pair)
                              for pair in PAM_USERS.items())))
        script.chmod(0o755)
        (self.confdir / "perdition").write_text(
            SERVICE.format(script=script, account=account))

    def seen(self):
        """'PAM_USER PAM_RHOST' for each time the script ran."""
        return self.seen_file.read_text().splitlines()

    def proxy(self, args, protocol, tmpdir, backend_port, local=True):
        """perdition (with -a unless *local* is false) using this PAM
        configuration; not started."""
        proxy = Perdition(["-a"] * local + args, protocol, tmpdir,
                          backend_port)
        proxy.env["PERDITION_PAM_CONFDIR"] = str(self.confdir)
        return proxy


@pytest.fixture
def pam(tmp_path):
    return PamConfig(tmp_path)


def scripted(protocol):
    """A scripted back-end that takes any login: it answers every IMAP
    command OK and every POP3 command +OK."""
    imap = protocol == "IMAP4"

    def script(peer):
        peer.send(b"* OK scripted ready\r\n" if imap else
                  b"+OK scripted ready\r\n")
        while True:
            line = peer.readline()
            peer.send(b"%s OK done\r\n" % line.split(b" ")[0] if imap
                      else b"+OK\r\n")
    return ScriptedBackend(script)


def user_sent(protocol, user):
    """How perdition names *user* to the real server."""
    return (b'LOGIN "%s" ' if protocol == "IMAP4" else b"USER %s\r\n") \
        % user.encode()


def login(protocol, port, user, password):
    """A client connection after a login; raises the client library's error
    when it fails (the connection stays open for another try)."""
    if protocol == "IMAP4":
        client = imap_connect(port)
        client.login(user, password)
    else:
        client = pop3_connect(port)
        client.user(user)
        client.pass_(password)
    return client


def try_login(client, user, password):
    """Another login on an open client connection; True if it worked."""
    try:
        if isinstance(client, imaplib.IMAP4):
            client.login(user, password)
        else:
            client.user(user)
            client.pass_(password)
    except (imaplib.IMAP4.error, poplib.error_proto):
        return False
    return True


def connect(protocol, port):
    return imap_connect(port) if protocol == "IMAP4" else pop3_connect(port)


def log_out(client):
    if isinstance(client, imaplib.IMAP4):
        client.logout()
    else:
        client.quit()


def auth_lines(proxy):
    return [line for line in proxy.log().splitlines() if "]: Auth: " in line]


# ---------------------------------------------------------------------------
# Logins that PAM accepts or refuses
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_right_password_reaches_dovecot(pam, dovecot, tmp_path, protocol):
    port = dovecot.imap_port if protocol == "IMAP4" else dovecot.pop3_port
    with pam.proxy([], protocol, tmp_path, port) as proxy:
        client = login(protocol, proxy.port, "alice", "alicepw")
        if protocol == "IMAP4":     # a mailbox only Dovecot can open
            assert client.select("INBOX")[0] == "OK"
        else:
            assert client.stat()[0] >= 0
        log_out(client)
        proxy.wait_for_log('user="alice" passwd="XXXXXX" server="127.0.0.1" '
                           'port="%d" status=ok' % port)
    assert pam.seen() == ["alice 127.0.0.1"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_wrong_password_reaches_no_server_and_retry_works(pam, tmp_path,
                                                          protocol):
    with scripted(protocol) as backend, \
            pam.proxy(["-d", "-C"], protocol, tmp_path,
                      backend.port) as proxy:
        client = connect(protocol, proxy.port)
        assert not try_login(client, "alice", "wrongpw")
        # The refusal is answered only after the whole login attempt.
        assert backend.peers == []
        line, = auth_lines(proxy)
        assert line.endswith('user="alice" passwd="XXXXXX" server="" '
                             'port="" ' + AUTH_FAILURE)
        assert try_login(client, "alice", "alicepw")
        log_out(client)
        backend.join(1)
        proxy.wait_for_log('user="alice" passwd="XXXXXX" server="127.0.0.1" '
                           'port="%d" status=ok' % backend.port)
        assert b"alicepw" in backend.received()
        assert b"wrongpw" not in backend.received()
        assert "wrongpw" not in proxy.log() and "alicepw" not in proxy.log()
    assert pam.seen() == ["alice 127.0.0.1"] * 2


def test_log_passwd_fail_shows_the_refused_password(pam, tmp_path):
    with scripted("IMAP4") as backend, \
            pam.proxy(["--log_passwd", "fail"], "IMAP4", tmp_path,
                      backend.port) as proxy:
        client = connect("IMAP4", proxy.port)
        assert not try_login(client, "alice", "wrongpw")
        assert try_login(client, "alice", "alicepw")
        log_out(client)
        proxy.wait_for_log("status=ok")
    refused, accepted = auth_lines(proxy)
    assert 'passwd="wrongpw"' in refused and AUTH_FAILURE in refused
    assert 'passwd="XXXXXX"' in accepted


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_account_refused_by_acct_mgmt(tmp_path, protocol):
    pam = PamConfig(tmp_path, account="pam_deny.so")
    with scripted(protocol) as backend, \
            pam.proxy([], protocol, tmp_path, backend.port) as proxy:
        client = connect(protocol, proxy.port)
        assert not try_login(client, "alice", "alicepw")
        assert not try_login(client, "alice", "alicepw")
        log_out(client)
        proxy.wait_for_log("Close: ")
        assert backend.peers == []
    assert [line.partition(" status=")[2] for line in auth_lines(proxy)] \
        == ["failed: Local authentication failed: pam_acct_mgmt: "
            "Authentication failure"] * 2
    # The password was right: pam_authenticate ran and let it through.
    assert pam.seen() == ["alice 127.0.0.1"] * 2


@pytest.mark.parametrize("protocol, options, user, password, pam_user", [
    ("IMAP4", ["-S", "local_authentication"], "alice@example.com",
     "alicepw", "alice"),
    ("POP3", ["-S", "local_authentication"], "alice@example.com",
     "alicepw", "alice"),
    ("IMAP4", ["-A", "local_authentication", "-e", "example.com"], "erin",
     "erinpw", "erin@example.com"),
    ("POP3", ["--lower_case", "local_authentication"], "ALICE", "alicepw",
     "alice"),
])
def test_pam_sees_the_name_rewritten_for_local_authentication(
        pam, tmp_path, protocol, options, user, password, pam_user):
    """PAM gets the local_authentication name; the real server still gets
    the remote_login one, which these options leave alone."""
    with scripted(protocol) as backend, \
            pam.proxy(options, protocol, tmp_path, backend.port) as proxy:
        log_out(login(protocol, proxy.port, user, password))
        backend.join(1)
        proxy.wait_for_log("status=ok")
    assert pam.seen() == ["%s 127.0.0.1" % pam_user]
    assert user_sent(protocol, user) in backend.received()
    assert user_sent(protocol, pam_user) not in backend.received()


def test_a_slow_pam_holds_up_only_its_own_session(pam, tmp_path):
    """PAM modules may wait on the network: one login stuck in PAM leaves
    every other session free to log in."""
    with scripted("IMAP4") as backend, \
            pam.proxy([], "IMAP4", tmp_path, backend.port) as proxy:
        stuck = RawClient(proxy.port)
        stuck.readline()
        stuck.send(b"s1 LOGIN slow secret\r\n")
        wait_until(lambda: "slow 127.0.0.1" in pam.seen(),
                   what="the script waiting for slow")
        log_out(login("IMAP4", proxy.port, "alice", "alicepw"))
        # Still waiting: the script holds the gate open.  (Without a
        # reader, this open fails at once rather than blocking.)
        gate = os.open(pam.gate, os.O_WRONLY | os.O_NONBLOCK)
        os.write(gate, b"go\n")
        os.close(gate)
        assert stuck.readline().startswith(b"s1 OK")
        stuck.close()
        backend.join(2)
    assert pam.seen() == ["slow 127.0.0.1", "alice 127.0.0.1"]


def test_a_reload_keeps_local_authentication(pam, tmp_path):
    """libpam lives as long as the process: a reload whose configuration
    file no longer has authenticate_in keeps it on, and says so."""
    conf = tmp_path / "perdition.conf"
    conf.write_text("authenticate_in\n")
    with scripted("IMAP4") as backend, \
            pam.proxy(["-f", conf], "IMAP4", tmp_path, backend.port,
                      local=False) as proxy:
        conf.write_text('ok_line "reloaded"\n')
        assert "]: Reload: option --authenticate_in cannot change without " \
            "a restart; keeping True\n" in proxy.reload()
        client = connect("IMAP4", proxy.port)
        assert not try_login(client, "alice", "wrongpw")
        assert backend.peers == []
        assert client.login("alice", "alicepw") == ("OK", [b"reloaded"])
        log_out(client)
    assert AUTH_FAILURE in auth_lines(proxy)[0]


# ---------------------------------------------------------------------------
# The conversation
# ---------------------------------------------------------------------------

PAM_PROMPT_ECHO_ON = 2


def converse(pam, styles, password=b"s3cret"):
    """Call perdition's conversation function as libpam would, through
    its C pointer; return (status, the answers or None)."""
    messages = (perdition.PamMessage * len(styles))(
        *[perdition.PamMessage(style, b"question?") for style in styles])
    pointers = (ctypes.POINTER(perdition.PamMessage) * len(styles))(
        *[ctypes.pointer(message) for message in messages])
    replies = ctypes.POINTER(perdition.PamResponse)()
    secret = ctypes.create_string_buffer(password)
    status = pam.conversation(len(styles), pointers, ctypes.byref(replies),
                              ctypes.cast(secret, ctypes.c_void_p))
    if not replies:
        return status, None
    answers = []
    for i in range(len(styles)):
        answers.append(ctypes.string_at(replies[i].resp)
                       if replies[i].resp else None)
        pam.libc.free(replies[i].resp)      # PAM's job, done here
    pam.libc.free(replies)
    return status, answers


def test_conversation_answers_only_the_password_prompt():
    pam = perdition.PAM("")
    assert converse(pam, [perdition.PAM_TEXT_INFO,
                          perdition.PAM_PROMPT_ECHO_OFF,
                          perdition.PAM_ERROR_MSG]) == \
        (perdition.PAM_SUCCESS, [None, b"s3cret", None])
    # An echo-on prompt (a user name, a one-time code) is a clean failure:
    # no answers at all, nothing left allocated.
    assert converse(pam, [perdition.PAM_PROMPT_ECHO_OFF,
                          PAM_PROMPT_ECHO_ON]) == (perdition.PAM_CONV_ERR,
                                                   None)
    assert converse(pam, []) == (perdition.PAM_CONV_ERR, None)


# ---------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------

def start_with_libpam(tmp_path, library, args):
    """perdition's main() with LIBPAM replaced by *library*, as on a
    machine where libpam is missing or is something else."""
    code = ("import sys; sys.path.insert(0, %r); import perdition; "
            "perdition.LIBPAM = %r; sys.exit(perdition.main(sys.argv))"
            % (os.path.dirname(PERDITION), library))
    return subprocess.run(
        [sys.executable, "-c", code, *args, "-F", "+", "-M", ""],
        stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=10, env=perdition_env(str(tmp_path)))


@pytest.mark.parametrize("library, reason", [
    ("libpam-not-here.so.0", "cannot load libpam-not-here.so.0"),
    ("libc.so.6", "libc.so.6 has no pam_start"),
])
def test_without_libpam_a_stops_start_up(tmp_path, library, reason):
    for args in (["-a"], ["--authenticate_in"]):
        result = start_with_libpam(tmp_path, library, args)
        assert result.returncode == 1
        assert "option -a, --authenticate_in: " in result.stderr
        assert reason in result.stderr



@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sasl_plain_takes_the_same_way_through_pam(pam, dovecot, tmp_path,
                                                   protocol):
    """AUTHENTICATE PLAIN / AUTH PLAIN credentials are checked by PAM like
    LOGIN's and USER/PASS's: a refusal reaches no server, the right
    password reaches Dovecot."""
    port = dovecot.imap_port if protocol == "IMAP4" else dovecot.pop3_port
    line = (b"a AUTHENTICATE PLAIN %s\r\n" if protocol == "IMAP4"
            else b"AUTH PLAIN %s\r\n")
    with pam.proxy([], protocol, tmp_path, port) as proxy, \
            RawClient(proxy.port) as client:
        client.readline()
        client.send(line % base64.b64encode(b"\0alice\0wrongpw"))
        assert client.readline().startswith((b"a NO ", b"-ERR "))
        proxy.wait_for_log(AUTH_FAILURE)
        client.send(line % base64.b64encode(b"\0alice\0alicepw"))
        assert client.readline().endswith(b"OK You are so in\r\n")
        proxy.wait_for_log('user="alice" passwd="XXXXXX" server="127.0.0.1" '
                           'port="%d" status=ok' % port)
    assert pam.seen() == ["alice 127.0.0.1"] * 2
