"""perdition under a service manager, with the files it ships in service/:
sd_notify readiness and state, socket activation by the real
systemd-socket-activate in both of systemd's modes (Accept=no: perdition
takes the listening socket; Accept=yes: a `perdition -i` per connection),
and the inetd.conf line.

Each test runs the command line of a shipped unit (or inetd.conf line),
with the installed program's path replaced by this checkout's perdition.py
and the options a test needs (log file, real server, loopback port) added.
"""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from dovecot import free_port
from helpers import (PERDITION, Perdition, RawClient, TIMEOUT, perdition_env,
                     pop3_connect, wait_until)
from support import ServiceManager, traversable, wait_for_eof

SERVICE = os.path.join(os.path.dirname(PERDITION), "service")
INSTALLED = "/usr/local/sbin/perdition"
ACTIVATE = shutil.which("systemd-socket-activate") or \
    "/usr/bin/systemd-socket-activate"


def unit(name):
    """A shipped unit file as {section: {key: value}}."""
    sections, section = {}, None
    with open(os.path.join(SERVICE, name)) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                section = sections.setdefault(line[1:-1], {})
            else:
                key, _, value = line.partition("=")
                section[key] = value
    return sections


def from_here(words):
    """A shipped command line, run from this checkout."""
    assert words[0] == INSTALLED, words
    return [sys.executable, PERDITION, *words[1:]]


def exec_start(name, instance=""):
    return from_here(shlex.split(
        unit(name)["Service"]["ExecStart"].replace("%i", instance)))


def exec_reload(name, pid):
    """ExecReload=, run as systemd would, with $MAINPID."""
    line = unit(name)["Service"]["ExecReload"].replace("$MAINPID", str(pid))
    subprocess.run(shlex.split(line), check=True, timeout=TIMEOUT)


def login_pop3(port, user="alice", password="alicepw"):
    client = pop3_connect(port)
    client.user(user)
    assert client.pass_(password).startswith(b"+OK")
    client.quit()


def login_imap(client, user="alice", password="alicepw"):
    client.send(b"a LOGIN %s %s\r\n" % (user.encode(), password.encode()))
    assert client.readline().startswith(b"a OK")
    client.send(b"b LOGOUT\r\n")
    assert b"b OK" in wait_for_eof(client)


class SocketActivate:
    """systemd-socket-activate listening on a free loopback port: without
    *accept* it hands the listening socket to *command* at the first
    connection (Accept=no), with it it runs *command* per connection
    (Accept=yes), on standard input with *inetd*.  *env* names the
    variables the children get (it passes no others)."""

    def __init__(self, command, tmpdir, env, accept=False, inetd=False):
        self.port = free_port()
        self.stderr_file = os.path.join(tmpdir, "activate.err")
        args = [ACTIVATE, "-l", f"127.0.0.1:{self.port}"]
        args += ["-a"] * accept + ["--inetd"] * inetd
        args += [f"--setenv={name}" for name in env] + command
        with open(self.stderr_file, "wb") as err:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, env={**os.environ, **env})
        wait_until(lambda: f"Listening on 127.0.0.1:{self.port} as 3." in
                   self.stderr(), what="systemd-socket-activate listening")

    def stderr(self):
        with open(self.stderr_file, errors="replace") as f:
            return f.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture
def here(tmp_path):
    traversable(tmp_path)
    return tmp_path


def test_shipped_units_are_what_the_manual_says():
    """The files the README tells administrators to install."""
    assert unit("perdition@.service")["Service"]["Type"] == "notify"
    assert unit("perdition-imap4.service")["Service"]["Type"] == "notify"
    assert unit("perdition-imap4.socket")["Socket"]["Accept"] == "no"
    assert unit("perdition-pop3.socket")["Socket"]["Accept"] == "yes"
    assert unit("perdition-pop3@.service")["Service"]["StandardInput"] == \
        "socket"
    assert "-i" in exec_start("perdition-pop3@.service")
    assert os.path.exists(os.path.join(SERVICE, "logrotate"))


@pytest.mark.parametrize("abstract", [True, False],
                         ids=["abstract", "path"])
def test_notify_ready_status_reload_and_stop(here, dovecot, abstract):
    """perdition@.service (Type=notify): READY=1 once listening, STATUS=
    with the sessions open, RELOADING=1 then READY=1 around the reload
    that ExecReload= asks for, STOPPING=1 at the stop."""
    manager = ServiceManager(None if abstract else here)
    proxy = Perdition([], "IMAP4", here, dovecot.imap_port)
    proxy.args = exec_start("perdition@.service", "imap4") + \
        proxy.args[proxy.args.index("-F"):]
    proxy.env["NOTIFY_SOCKET"] = manager.address
    with manager, proxy:
        ready = manager.wait_for("READY=1")
        if "STATUS=0 sessions open" not in ready:
            # The helper's probe connection was still open: its end shows.
            assert "STATUS=1 sessions open" in ready
            manager.wait_for("STATUS=0 sessions open")
        assert "Listening on 127.0.0.1 port" in proxy.log()
        client = RawClient(proxy.port)
        client.readline()
        assert "STATUS=1 sessions open" in manager.wait_for(
            "STATUS=1 sessions open")
        exec_reload("perdition@.service", proxy.pid)
        reloading = manager.wait_for("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        assert "STATUS=1 sessions open" in manager.wait_for("READY=1")
        proxy.wait_for_log("Reloaded: generation 2")
        os.kill(proxy.pid, signal.SIGTERM)
        manager.wait_for("STOPPING=1")
        login_imap(client)          # within the grace period
        assert proxy.proc.wait(TIMEOUT) == 0


def test_socket_activation_accept_no(here, dovecot):
    """perdition-imap4.socket and .service: perdition serves the listening
    socket systemd-socket-activate passes (and binds none of its own),
    is ready, reloads and stops as a Type=notify service."""
    assert unit("perdition-imap4.socket")["Socket"]["ListenStream"] == "143"
    own_port = free_port()
    log = here / "activated.log"
    manager = ServiceManager()
    env = {**perdition_env(str(here)), "NOTIFY_SOCKET": manager.address}
    command = exec_start("perdition-imap4.service") + [
        "-F", str(log), "-s", f"127.0.0.1:{dovecot.imap_port}", "-M", "",
        "-b", "127.0.0.1", "-l", str(own_port)]
    activate = SocketActivate(command, here, env)
    try:
        with manager:
            first = RawClient(activate.port)    # perdition starts now
            assert first.readline().startswith(b"* OK IMAP4 Ready")
            manager.wait_for("READY=1")
            with RawClient(activate.port) as second:
                assert second.readline().startswith(b"* OK IMAP4 Ready")
                login_imap(second)
            login_imap(first)
            first.close()
            text = log.read_text()
            assert f"Listening on 127.0.0.1 port {activate.port}\n" in text
            assert text.count(f"perdition[{activate.proc.pid}]: Connect: "
                              "127.0.0.1\n") == 2
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", own_port), 1)
            # systemd-socket-activate exec'd perdition: the same process.
            exec_reload("perdition-imap4.service", activate.proc.pid)
            manager.wait_for("RELOADING=1")
            manager.wait_for("READY=1")
            activate.proc.send_signal(signal.SIGTERM)
            manager.wait_for("STOPPING=1")
            assert activate.proc.wait(TIMEOUT) == 0
    finally:
        activate.close()


def inetd_command(protocol):
    """The inetd.conf line of *protocol*: its program and arguments."""
    with open(os.path.join(SERVICE, "inetd.conf")) as f:
        for line in f:
            fields = line.split()
            if fields and not line.startswith("#") and \
                    f"-P {protocol}" in line:
                assert fields[1:5] == ["stream", "tcp", "nowait", "root"]
                assert fields[5] == INSTALLED and fields[6] == "perdition"
                return from_here([INSTALLED, *fields[7:]])
    raise AssertionError(f"no {protocol} line in inetd.conf")


@pytest.mark.parametrize("source,inetd", [
    ("perdition-pop3@.service", True),      # StandardInput=socket
    ("perdition-pop3@.service", False),     # the connection as fd 3
    ("inetd.conf", True),
])
def test_socket_activation_accept_yes(here, dovecot, source, inetd):
    """A `perdition -i` for each connection, as Accept=yes and inetd run
    it: two sessions at once, each its own process."""
    command = exec_start(source) if source.endswith(".service") \
        else inetd_command("POP3")
    log = here / "accepted.log"
    command += ["-F", str(log), "-s", f"127.0.0.1:{dovecot.pop3_port}",
                "-M", ""]
    activate = SocketActivate(command, here, perdition_env(str(here)),
                              accept=True, inetd=inetd)
    try:
        with RawClient(activate.port) as waiting:
            assert waiting.readline().startswith(b"+OK POP3 Ready")
            login_pop3(activate.port, "bob", "bobpw")
            waiting.send(b"QUIT\r\n")
            assert wait_for_eof(waiting) == b"+OK Bye\r\n"
        wait_until(lambda: log.read_text().count("Close: ") == 2,
                   what="two Close lines")
        text = log.read_text()
        pids = {line.split("inetd_pid=")[1].rstrip("]")
                for line in text.splitlines() if "Connect: " in line}
        assert len(pids) == 2, text
        assert 'Auth: 127.0.0.1 user="bob" passwd="XXXXXX"' in text
    finally:
        activate.close()
