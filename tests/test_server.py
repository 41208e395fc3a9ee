"""The listening server (issue 2, item 2): ports and addresses, the
connection limit, daemonising with a pid file, dropping privileges, inetd
mode, many sessions at once without leaks, and the authentication timeout.

perdition runs as root here, as an administrator starts it, so it drops to
nobody (or -u/-g) after binding; the tests read the result in /proc.
"""

import _thread
import grp
import os
import pwd
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dovecot import free_port
from helpers import (PERDITION, Perdition, RawClient, TIMEOUT, imap_connect,
                     perdition_env, run_perdition, wait_until)
from support import (ScriptedBackend, reaped, settled_usage, traversable,
                     wait_for_usage)

sys.path.insert(0, os.path.dirname(PERDITION))
import perdition  # noqa: E402

as_root = pytest.mark.skipif(os.geteuid() != 0,
                             reason="changing user needs root")


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = has_ipv6_loopback()


def accepts(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def proc_status(pid):
    """/proc/<pid>/status as {field: [values]}."""
    with open("/proc/%d/status" % pid) as f:
        return {key: value.split() for key, _, value in
                (line.partition(":") for line in f)}


def alive(pid):
    """True if *pid* exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def imap_session(client, user="alice", password="alicepw"):
    """Log in, NOOP and log out over a RawClient that has read the
    greeting; the connection must then end."""
    client.send(b"a LOGIN %s %s\r\n" % (user.encode(), password.encode()))
    assert client.readline() == b"a OK You are so in\r\n"
    client.send(b"b NOOP\r\n")
    assert client.read_until(b"\r\n", TIMEOUT).startswith(b"b OK")
    client.send(b"c LOGOUT\r\n")
    assert b"\r\nc OK" in client.read_until(b"\r\nc OK")
    client.read_until(b"\r\n")
    assert client.readline() == b""


def pop3_session(client, user="alice", password="alicepw"):
    client.send(b"USER %s\r\n" % user.encode())
    assert client.readline().startswith(b"+OK")
    client.send(b"PASS %s\r\n" % password.encode())
    assert client.readline() == b"+OK You are so in\r\n"
    client.send(b"STAT\r\n")
    assert client.readline().startswith(b"+OK ")
    client.send(b"QUIT\r\n")
    assert client.readline().startswith(b"+OK")
    assert client.readline() == b""


@pytest.fixture(scope="module")
def proxy(dovecot, tmp_path_factory):
    """One IMAP perdition with the default options, for the tests that
    need nothing special."""
    with Perdition([], "IMAP4", tmp_path_factory.mktemp("proxy"),
                   dovecot.imap_port) as running:
        yield running


# ---------------------------------------------------------------------------
# Ports and addresses
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, port", [("pop3", 110), ("pop3s", 995),
                                        ("imap2", 143), ("imaps", 993)])
def test_port_names_from_etc_services(name, port):
    """A named port is looked up in /etc/services; binding port 110 and
    friends would clash with the machine, so the parse is what is tested."""
    config = perdition.Config(["perdition", "-f", "", "-l", name,
                               "-p", name, "-s", "mail.example.net:" + name,
                               "-b", "127.0.0.1:" + name])
    assert (config.listen_port, config.outgoing_port) == (port, port)
    assert config.outgoing_server == [("mail.example.net", port)]
    assert config.bind_address == [("127.0.0.1", port)]


@pytest.mark.parametrize("protocol, port", [("POP3", 110), ("POP3S", 995),
                                            ("IMAP4", 143), ("IMAP4S", 993)])
def test_default_listen_port(protocol, port):
    config = perdition.Config(["perdition", "-f", "", "-P", protocol])
    assert perdition.listen_addresses(config)[0][1] == port


def test_several_bind_addresses(perdition_factory, dovecot):
    """-b host[:port],...: each address listens, on its own port or on
    --listen_port, and nothing else does."""
    other = free_port()
    addresses = ["127.0.0.1", "127.0.0.2:%d" % other]
    if IPV6:
        v6_port = free_port()
        addresses.append("[::1]:%d" % v6_port)
    proxy = perdition_factory(["-b", ",".join(addresses)], "IMAP4",
                              dovecot.imap_port)
    listening = [("127.0.0.1", proxy.port), ("127.0.0.2", other)]
    if IPV6:
        listening.append(("::1", v6_port))
    for host, port in listening:
        with RawClient(port, host) as client:
            assert client.readline().startswith(b"* OK IMAP4 Ready ")
            imap_session(client)
    if IPV6:
        proxy.wait_for_log("Connect: ::1\n")
    assert not accepts("127.0.0.2", proxy.port)
    assert not accepts("127.0.0.1", other)
    log = proxy.log()
    for host, port in listening:
        assert "Listening on %s port %d" % (host, port) in log


def test_empty_bind_address_listens_everywhere(perdition_factory, dovecot):
    proxy = perdition_factory(["-b", ""], "IMAP4", dovecot.imap_port)
    hosts = ["127.0.0.1", "127.0.0.2"] + ["::1"] * IPV6
    for host in hosts:
        with RawClient(proxy.port, host) as client:
            assert client.readline().startswith(b"* OK IMAP4 Ready ")


# ---------------------------------------------------------------------------
# The connection limit
# ---------------------------------------------------------------------------

def admitted(port, greeting):
    """A RawClient that got *greeting*: a slot may take a moment to come
    free after the session that held it ends."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        client = RawClient(port)
        line = client.readline()
        if line.startswith(greeting):
            return client
        client.close()
        assert time.monotonic() < deadline, "never admitted: %r" % line
        time.sleep(0.05)


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_connection_limit(perdition_factory, dovecot, protocol):
    imap = protocol == "IMAP4"
    proxy = perdition_factory(["-L", "2"], protocol, dovecot.imap_port
                              if imap else dovecot.pop3_port)
    session = imap_session if imap else pop3_session
    greeting = b"* OK " if imap else b"+OK "
    first = admitted(proxy.port, greeting)
    second = admitted(proxy.port, greeting)
    with RawClient(proxy.port) as third:
        refusal = third.readline()
        assert refusal.startswith(b"* BYE " if imap else b"-ERR ")
        assert refusal.endswith(b"\r\n") and len(refusal) > 8
        assert third.readline() == b""
    session(second)          # the others keep working
    second.close()
    with first:
        with admitted(proxy.port, greeting) as fourth:   # a slot came free
            session(fourth)
        session(first)


# ---------------------------------------------------------------------------
# Daemon and pid file
# ---------------------------------------------------------------------------

def read_file(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


@as_root
def test_daemon_with_pid_file(tmp_path, dovecot):
    traversable(tmp_path)
    env = perdition_env(str(tmp_path))
    port = free_port()
    log = tmp_path / "perdition.log"
    pid_file = os.path.join(env["PERDITION_VAR_STATE_DIR"], "perdition",
                            "perdition.pid")
    with open(tmp_path / "out", "wb") as out:
        started = subprocess.run(
            [sys.executable, PERDITION, "-P", "IMAP4", "-F", str(log),
             "-b", "127.0.0.1", "-l", str(port),
             "-s", "127.0.0.1:%d" % dovecot.imap_port, "-M", ""],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
            timeout=TIMEOUT)
    assert started.returncode == 0      # the parent returns at once
    wait_until(lambda: read_file(pid_file).endswith("\n"), what="pid file")
    pid = int(read_file(pid_file))
    try:
        assert alive(pid)
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            assert PERDITION.encode() in f.read().split(b"\0")
        assert os.getsid(pid) != os.getsid(0)      # off our terminal
        assert int(proc_status(pid)["PPid"][0]) != os.getpid()
        wait_until(lambda: accepts("127.0.0.1", port), what="listening")
        with RawClient(port) as client:
            assert client.readline().startswith(b"* OK IMAP4 Ready ")
            imap_session(client)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), what="exit on SIGTERM")
        assert not os.path.exists(pid_file)
        lines = log.read_text().splitlines()
        assert any("Exiting on signal" in line for line in lines)
        # Every line, from the first, names the daemon, not its parent.
        assert all(" perdition[%d]: " % pid in line for line in lines)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("facility", ["--no_daemon", "-", "+"])
def test_foreground_writes_and_removes_the_pid_file(tmp_path, dovecot,
                                                    facility):
    """--no_daemon, or logging to stdout or stderr: perdition stays in the
    foreground, and writes its pid file all the same (supervisors read
    it); it removes the file when it exits, as nobody by then."""
    traversable(tmp_path)
    proxy = Perdition([] if facility == "--no_daemon" else ["-F", facility],
                      "IMAP4", tmp_path, dovecot.imap_port)
    if facility != "--no_daemon":
        proxy.args.remove("--no_daemon")
    pid_file = os.path.join(proxy.env["PERDITION_VAR_STATE_DIR"],
                            "perdition", "perdition.pid")
    with proxy:
        assert proxy.proc.poll() is None
        assert os.getsid(proxy.pid) == os.getsid(0)
        output = {"--no_daemon": proxy.log, "-": proxy.stdout,
                  "+": proxy.stderr}[facility]
        wait_until(lambda: "Listening on 127.0.0.1" in output(),
                   what="log in %s" % facility)
        assert read_file(pid_file) == "%d\n" % proxy.pid
    assert proxy.proc.returncode == 0
    assert not os.path.exists(pid_file)
    assert "Cannot" not in output()


def test_a_shared_directory_of_the_pid_file_keeps_its_owner(tmp_path,
                                                           dovecot):
    """A pid file in a directory others share (as /run or /tmp) never makes
    perdition give that directory to -u: the file stays when perdition
    stops, and the log says so at start-up."""
    traversable(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    pid_file = shared / "perdition.pid"
    with Perdition(["--pid_file", pid_file], "IMAP4", tmp_path,
                   dovecot.imap_port) as proxy:
        log = proxy.wait_for_log("Listening on ")
        assert "The pid file %s will stay when perdition stops" % pid_file \
            in log
    stat = os.stat(shared)
    assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o7777) == \
        (0, 0, 0o1777)
    assert pid_file.exists()


def test_a_pid_file_of_another_process_is_not_removed(tmp_path, dovecot):
    """Another perdition wrote its pid in the same file meanwhile: it is
    that one's, and stays."""
    traversable(tmp_path)
    pid_file = tmp_path / "run" / "perdition.pid"
    with Perdition(["--pid_file", pid_file], "IMAP4", tmp_path,
                   dovecot.imap_port) as proxy:
        proxy.wait_for_log("Listening on ")
        assert pid_file.read_text() == "%d\n" % proxy.pid
        pid_file.write_text("1\n")
    assert pid_file.read_text() == "1\n"


def test_planted_link_in_place_of_the_pid_file_is_not_followed(tmp_path,
                                                               dovecot):
    """A link planted where the pid file goes (to make root overwrite
    another file) is replaced, not followed; so is a stale file.  The
    directory is nobody's, as one left by an earlier run is: whoever takes
    over perdition's user can write there."""
    traversable(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    directory = tmp_path / "run" / "imap"
    directory.mkdir(parents=True)
    nobody = pwd.getpwnam("nobody")
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    pid_file = directory / "perdition.pid"
    pid_file.symlink_to(victim)
    with Perdition(["--pid_file", pid_file], "IMAP4", tmp_path,
                   dovecot.imap_port) as proxy:
        proxy.wait_for_log("Listening on ")
        assert not pid_file.is_symlink()
        assert pid_file.read_text() == "%d\n" % proxy.pid
        assert victim.read_text() == "precious\n"
    assert not pid_file.exists() and victim.read_text() == "precious\n"


def test_pid_file_asked_for_must_be_written(tmp_path):
    result = run_perdition(["--no_daemon", "-F", "+", "-M", "", "-l",
                            free_port(), "--pid_file",
                            "/proc/no/such/dir/perdition.pid"],
                           tmpdir=tmp_path)
    assert result.returncode == 1
    assert "option --pid_file: /proc/no/such/dir/perdition.pid: " in \
        result.stderr


# ---------------------------------------------------------------------------
# Privileges
# ---------------------------------------------------------------------------

def nobody_ids():
    user = pwd.getpwnam("nobody")
    try:
        return user.pw_uid, grp.getgrnam("nobody").gr_gid
    except KeyError:        # Debian: no group nobody, the user's own group
        return user.pw_uid, user.pw_gid


def assert_runs_as(pid, uid, gid):
    status = proc_status(pid)
    assert status["Uid"] == [str(uid)] * 4
    assert status["Gid"] == [str(gid)] * 4
    assert status["Groups"] == [str(gid)]


@as_root
def test_drops_to_nobody_by_default(proxy):
    # The port accepts from the bind on; privileges go just before this.
    proxy.wait_for_log("Starting: ")
    assert_runs_as(proxy.pid, *nobody_ids())
    with RawClient(proxy.port) as client:
        client.readline()
        imap_session(client)


def free_privileged_port():
    for port in range(700, 1024):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.fail("no free port below 1024")


@as_root
def test_drops_to_user_and_group_after_binding_a_low_port(tmp_path,
                                                          dovecot):
    proxy = Perdition(["-u", "daemon", "-g", "mail"], "IMAP4", tmp_path,
                      dovecot.imap_port)
    proxy.port = free_privileged_port()
    proxy.args[proxy.args.index("-l") + 1] = str(proxy.port)
    with proxy:
        proxy.wait_for_log("Starting: ")
        assert_runs_as(proxy.pid, pwd.getpwnam("daemon").pw_uid,
                       grp.getgrnam("mail").gr_gid)
        with RawClient(proxy.port) as client:
            client.readline()
            imap_session(client)


# ---------------------------------------------------------------------------
# inetd mode
# ---------------------------------------------------------------------------

def test_inetd_mode(tmp_path, dovecot):
    """As inetd runs it: one accepted TCP connection as stdin and stdout,
    one session, then exit."""
    log = tmp_path / "inetd.log"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = RawClient(listener.getsockname()[1])
        connection, _ = listener.accept()
    with connection, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, PERDITION, "-P", "IMAP4", "-i", "-F", str(log),
             "-s", "127.0.0.1:%d" % dovecot.imap_port, "-M", ""],
            stdin=connection, stdout=connection, stderr=err,
            env=perdition_env(str(tmp_path)))
    with reaped(proc):
        with client:
            assert client.readline().startswith(b"* OK IMAP4 Ready ")
            if os.geteuid() == 0:
                assert_runs_as(proc.pid, *nobody_ids())
            imap_session(client)
        assert proc.wait(TIMEOUT) == 0
    text = log.read_text()
    assert "Connect: 127.0.0.1[inetd_pid=%d]\n" % proc.pid in text
    assert 'Auth: 127.0.0.1 user="alice" passwd="XXXXXX" server="127.0.0.1"' \
        ' port="%d" status=ok\n' % dovecot.imap_port in text
    assert 'Close: 127.0.0.1 user="alice" received=' in text
    assert (tmp_path / "err").read_bytes() == b""


INETD_POPMAP = ("'^192\\.0\\.2\\.7:40000:alice$' 127.0.0.1:{port}\n"
                "'^:(none)?:alice$' 127.0.0.1:{port}\n")


@pytest.mark.parametrize("remote", [{"TCPREMOTEIP": "192.0.2.7",
                                     "TCPREMOTEPORT": "40000"}, {}],
                         ids=["tcpserver", "unknown"])
def test_inetd_mode_on_a_unix_socket(tmp_path, dovecot, remote):
    """-i on a UNIX-domain socket (stunnel's exec, socat, a supervisor's
    socketpair): the client address is ucspi-tcp's TCPREMOTEIP and
    TCPREMOTEPORT when set, else unknown in the log and empty in the
    query-key escapes."""
    traversable(tmp_path)
    log = tmp_path / "inetd.log"
    popmap = tmp_path / "popmap.re"
    popmap.write_text(INETD_POPMAP.format(port=dovecot.imap_port))
    popmap.chmod(0o644)
    here, there = socket.socketpair()
    env = {**perdition_env(str(tmp_path)), **remote}
    with there, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, PERDITION, "-P", "IMAP4", "-i", "-F", str(log),
             "-M", "posix_regex", "-m", str(popmap),
             "--query_key", "\\i:\\p:\\U"],
            stdin=there, stdout=there, stderr=err, env=env)
    with reaped(proc):
        with here:
            here.settimeout(TIMEOUT)
            reader = here.makefile("rb")
            assert reader.readline().startswith(b"* OK IMAP4 Ready ")
            here.sendall(b"a LOGIN alice alicepw\r\n")
            assert reader.readline().startswith(b"a OK")
            here.sendall(b"b LOGOUT\r\n")
            assert b"b OK" in reader.read()
        assert proc.wait(TIMEOUT) == 0
    text = log.read_text()
    client = remote.get("TCPREMOTEIP", "unknown")
    assert "Connect: %s[inetd_pid=%d]\n" % (client, proc.pid) in text
    assert 'Auth: %s user="alice" passwd="XXXXXX" server="127.0.0.1" ' \
        'port="%d" status=ok\n' % (client, dovecot.imap_port) in text
    assert 'Close: %s user="alice" received=' % client in text
    assert (tmp_path / "err").read_bytes() == b""


def test_inetd_mode_needs_a_connected_stream_socket(tmp_path):
    """A pipe, or a datagram socket, is no connection: a clean start-up
    error, not a traceback."""
    read, write = os.pipe()
    here, there = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for stdin in (read, there):
        result = subprocess.run(
            [sys.executable, PERDITION, "-P", "IMAP4", "-i", "-F", "+",
             "-s", "127.0.0.1:143", "-M", ""],
            stdin=stdin, stdout=write, stderr=subprocess.PIPE, text=True,
            env=perdition_env(str(tmp_path)), timeout=TIMEOUT)
        assert result.returncode != 0
        assert result.stderr == "perdition: option -i, --inetd_mode: " \
            "standard input is not a connected stream socket\n"
    for fd in (read, write):
        os.close(fd)
    here.close()
    there.close()


# ---------------------------------------------------------------------------
# Many sessions
# ---------------------------------------------------------------------------

def test_hundred_sessions_at_once(proxy):
    """100 clients logged in through perdition at the same moment, each
    then selecting its INBOX."""
    together = threading.Barrier(100, timeout=30)

    def session(n):
        imap = imap_connect(proxy.port)
        try:
            try:
                assert imap.login("user%d" % n, "pw%d" % n) == \
                    ("OK", [b"You are so in"])
            except BaseException:
                together.abort()
                raise
            together.wait()
            assert imap.select("INBOX")[0] == "OK"
        finally:
            imap.logout()
        return n

    with ThreadPoolExecutor(100) as pool:
        assert list(pool.map(session, range(1, 101))) == \
            list(range(1, 101))


def test_no_thread_or_descriptor_left_behind(proxy):
    """300 sessions -- logins, failed logins, clients that vanish -- and
    perdition is back to the threads and descriptors it had before."""
    before = settled_usage(proxy)

    def session(n):
        client = RawClient(proxy.port)
        with client:
            assert client.readline().startswith(b"* OK")
            kind = n % 10
            number = n % 200 + 1
            user, password = "user%d" % number, "pw%d" % number
            if kind == 0:                   # gone after the greeting
                return
            if kind == 1:                   # gone in the middle
                client.send(b"a LOGIN %s %s\r\nb SELECT INBOX\r\n"
                            % (user.encode(), password.encode()))
                assert client.readline() == b"a OK You are so in\r\n"
                return
            if kind == 2:                   # a wrong password first
                client.send(b"a LOGIN %s wrong\r\n" % user.encode())
                assert client.readline().startswith(b"a NO ")
            imap_session(client, user, password)

    with ThreadPoolExecutor(30) as pool:
        list(pool.map(session, range(300)))
    wait_for_usage(proxy, before)


def test_workers_are_reused_then_end():
    """A finished worker thread takes the next task; at most `keep` wait,
    each for `linger` seconds, and then they end."""
    workers = perdition.Workers(keep=2, linger=2)
    threads, done = [], threading.Semaphore(0)

    def task(hold):
        threads.append(_thread.get_native_id())
        hold.wait(5)
        done.release()

    def alive():
        return sum(os.path.exists("/proc/self/task/%d" % tid)
                   for tid in set(threads))

    free = threading.Event()
    free.set()
    for _ in range(3):                  # one after another: one thread
        workers.start(task, free)
        assert done.acquire(timeout=5)
        wait_until(lambda: workers._idle, what="the worker waiting")
    assert len(set(threads)) == 1
    holds = [threading.Event() for _ in range(4)]
    for hold in holds:                  # four at once: four threads
        workers.start(task, hold)
    wait_until(lambda: len(threads) == 7, what="four tasks running")
    assert len(set(threads[3:])) == 4 and threads[0] in threads[3:]
    for hold in holds:
        hold.set()
        assert done.acquire(timeout=5)
    wait_until(lambda: alive() == 2, timeout=1.5, what="two workers kept")
    wait_until(lambda: alive() == 0, timeout=5, what="the workers ended")


# ---------------------------------------------------------------------------
# The authentication timeout
# ---------------------------------------------------------------------------

def test_authentication_timeout(perdition_factory, dovecot):
    """An unauthenticated client idle for --authentication_timeout seconds
    is told BYE and closed; activity restarts the clock; a logged-in
    session is under -t instead."""
    proxy = perdition_factory(["--authentication_timeout", "1"], "IMAP4",
                              dovecot.imap_port)
    with RawClient(proxy.port) as idle, RawClient(proxy.port) as active:
        assert idle.readline().startswith(b"* OK")
        assert active.readline().startswith(b"* OK")
        active.send(b"a LOGIN alice alicepw\r\n")
        assert active.readline() == b"a OK You are so in\r\n"
        time.sleep(0.6)
        idle.send(b"n NOOP\r\n")
        assert idle.readline() == b"n OK NOOP completed\r\n"
        noop = time.monotonic()
        assert idle.readline(timeout=5).startswith(b"* BYE ")
        assert time.monotonic() - noop > 0.9
        assert idle.readline() == b""
        # By now the logged-in session has been idle for over 1.5 s.
        active.send(b"b NOOP\r\n")
        assert active.readline().startswith(b"b OK")


def silent(peer):
    """A real server that accepts and never says a word."""
    peer.read_to_end()


def mute_after_login(peer):
    """A real server that greets, reads the LOGIN and never answers.  (Its
    greeting names its capabilities, so perdition asks for none.)"""
    peer.send(b"* OK [CAPABILITY IMAP4rev1] scripted IMAP ready\r\n")
    peer.readline()
    peer.read_to_end()


@pytest.mark.parametrize("protocol, script, credentials_sent", [
    ("IMAP4", silent, False),
    ("POP3", silent, False),
    ("IMAP4", mute_after_login, True),
])
def test_a_client_leaving_during_the_login_is_not_waited_for(
        perdition_factory, protocol, script, credentials_sent):
    """LOGIN-and-close clients against a real server that is slow to
    greet (or to answer the LOGIN): perdition notices each client's
    departure at once, sends no credentials that no one waits for, and
    keeps no thread or descriptor -- long before the 1800 s of
    --authentication_timeout."""
    clients = 40
    with ScriptedBackend(script) as backend:
        proxy = perdition_factory([], protocol, backend.port)
        before = settled_usage(proxy)
        login = b"a LOGIN alice alicepw\r\n" if protocol == "IMAP4" \
            else b"USER alice\r\nPASS alicepw\r\n"

        def leave(n):
            with RawClient(proxy.port) as client:
                client.readline()
                client.send(login)
                if protocol == "POP3":
                    assert client.readline().startswith(b"+OK")
                if credentials_sent:    # gone once the server has it
                    wait_until(lambda: backend.received().count(b"LOGIN")
                               > n, what="the LOGIN of client %d" % n)

        if credentials_sent:
            for n in range(clients):
                leave(n)
        else:
            with ThreadPoolExecutor(20) as pool:
                list(pool.map(leave, range(clients)))
        backend.join(clients)
        wait_for_usage(proxy, before)
        proxy.wait_for_log("status=failed: client left during the login",
                           count=clients)
        if not credentials_sent:
            assert backend.received() == b""


def take_starttls(peer):
    """Greet offering STARTTLS, and say OK to perdition's STARTTLS."""
    peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] scripted IMAP "
              b"ready\r\n")
    tag, verb = peer.readline().split()
    assert verb == b"STARTTLS", verb
    peer.send(tag + b" OK Begin TLS negotiation now\r\n")


def mute_after_starttls(context):
    """A real server that offers STARTTLS, takes it, and then says nothing
    inside TLS: perdition's CAPABILITY there goes unanswered."""
    def script(peer):
        take_starttls(peer)
        peer.start_tls(context)
        peer.readline()                 # in TLS: CAPABILITY
        peer.result = "waiting"
        peer.read_to_end()
    return script


def stalled_handshake(context):
    """A real server that answers STARTTLS with OK and never goes on with
    the handshake: perdition's ClientHello goes unanswered."""
    def script(peer):
        take_starttls(peer)
        peer.read_exact(1)              # the ClientHello has begun
        peer.result = "waiting"
        peer.read_to_end()
    return script


@pytest.mark.parametrize("script", [mute_after_starttls, stalled_handshake])
def test_a_client_leaving_during_tls_towards_the_server_is_not_waited_for(
        perdition_factory, dovecot, script):
    """--ssl_mode tls_outgoing: a client that leaves while perdition waits
    for its real server inside TLS, or in a handshake the server stalls,
    is noticed there too, as in plaintext: the login is abandoned without
    a LOGIN, and no thread or descriptor is kept -- long before
    --connect_timeout or --authentication_timeout would end the wait.
    Each client leaves only once its server is in that state."""
    clients = 20
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(dovecot.cert_file, dovecot.key_file)
    with ScriptedBackend(script(context)) as backend:
        proxy = perdition_factory(["--ssl_mode", "tls_outgoing",
                                   "--ssl_ca_file", dovecot.cert_file,
                                   "--connect_timeout", "600"], "IMAP4",
                                  backend.port)
        before = settled_usage(proxy)
        for n in range(clients):
            with RawClient(proxy.port) as client:
                client.readline()
                client.send(b"a LOGIN alice alicepw\r\n")
                wait_until(lambda: len(backend.peers) > n and
                           backend.peers[n].result == "waiting",
                           what="server %d waited for in TLS" % n)
        backend.join(clients)
        wait_for_usage(proxy, before)
        proxy.wait_for_log("status=failed: client left during the login",
                           count=clients)
        received = backend.received().upper()
        assert b"LOGIN" not in received and b"AUTHENTICATE" not in received


# ---------------------------------------------------------------------------
# File descriptors: the limit is raised, and a too low one is logged
# ---------------------------------------------------------------------------

def open_files_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                return [int(n) for n in line.split()[3:5]]
    raise AssertionError("no open files limit for %d" % pid)


def test_file_descriptor_limit_raised_and_checked(tmp_path, dovecot,
                                                  monkeypatch):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 256:
        pytest.fail("the hard file-descriptor limit is too low to test")
    monkeypatch.setattr(subprocess, "Popen", _popen_with_soft_limit(256))
    too_many = hard // 2 + 1        # two descriptors a session
    proxy = Perdition(["-L", str(too_many)], "IMAP4", tmp_path,
                      dovecot.imap_port).start()
    try:
        assert open_files_limit(proxy.pid) == [hard, hard]
        proxy.wait_for_log("File descriptor limit %d is too low for "
                           "connection_limit %d" % (hard, too_many))
    finally:
        proxy.stop()
    proxy = Perdition(["-L", "10"], "IMAP4", tmp_path,
                      dovecot.imap_port).start()
    try:
        proxy.wait_for_log("Starting: ")
        assert "too low" not in proxy.log()
    finally:
        proxy.stop()


def _popen_with_soft_limit(soft):
    import resource
    popen = subprocess.Popen

    def start(*args, **kwargs):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        kwargs["preexec_fn"] = lambda: resource.setrlimit(
            resource.RLIMIT_NOFILE, (soft, hard))
        return popen(*args, **kwargs)
    return start
