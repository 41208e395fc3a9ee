"""Run perdition as a real process and talk to it, for the tests.

perdition is exercised the way an administrator runs it -- a separate
process with a command line, a log file and a listening port -- so the tests
see exactly what its users would.  Every wait here is bounded in time.
"""

import imaplib
import itertools
import os
import poplib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from dovecot import free_port

__all__ = ["PERDITION", "Perdition", "run_perdition", "perdition_env",
           "readable_copy",
           "wait_until", "imap_connect",
           "pop3_connect", "RawClient", "TIMEOUT"]

PERDITION = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "perdition.py")
# Client timeout for every connection the tests make.
TIMEOUT = 10
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_serial = itertools.count(1)


def perdition_env(tmpdir):
    """The environment perdition runs in: its sysconfdir and var state dir
    point into *tmpdir*, so no /etc/perdition/perdition.conf of the machine
    (the Debian package ships one) changes what a test sees."""
    env = dict(os.environ)
    for name, sub in (("PERDITION_SYSCONFDIR", "etc"),
                      ("PERDITION_VAR_STATE_DIR", "run")):
        path = os.path.join(tmpdir, sub)
        os.makedirs(path, exist_ok=True)
        env[name] = path
    return env


def readable_copy(directory):
    """perdition.py and perdition_maps.py copied into *directory* (made if
    need be), readable by every user; returns the copy of perdition.py.

    For a test that starts perdition as another user: the checkout may lie
    where only root may enter (a mktemp -d folder, /root).  The caller
    makes *directory* reachable for that user."""
    os.makedirs(directory, exist_ok=True)
    for name in ("perdition.py", "perdition_maps.py"):
        copy = os.path.join(directory, name)
        shutil.copy(os.path.join(os.path.dirname(PERDITION), name), copy)
        os.chmod(copy, 0o644)
    return os.path.join(directory, "perdition.py")


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


class Perdition:
    """One perdition process listening on a free loopback port.

    The command line is the one the manual documents for a foreground
    proxy logging to a file:

        python3 perdition.py -P PROTOCOL --no_daemon -F LOGFILE
            -b 127.0.0.1 -l PORT --auth_failure_delay 0
            [-s 127.0.0.1:BACKEND_PORT -M ""] ARGS...

    where the outgoing server (with no popmap) is added only when
    *backend_port* is given.  Log, standard output and standard error go to
    files in *tmpdir* (a new temporary directory if None).
    """

    def __init__(self, args, protocol="IMAP4", tmpdir=None, backend_port=None):
        self.tmpdir = os.fspath(tmpdir) if tmpdir is not None \
            else tempfile.mkdtemp(prefix="perdition-")
        n = next(_serial)
        self.log_file = os.path.join(self.tmpdir, f"perdition-{n}.log")
        self.stdout_file = os.path.join(self.tmpdir, f"perdition-{n}.out")
        self.stderr_file = os.path.join(self.tmpdir, f"perdition-{n}.err")
        self.port = free_port()
        # No --auth_failure_delay, as a test Dovecot has no
        # auth_failure_delay: the tests of failures would wait seconds.
        self.args = [sys.executable, PERDITION, "-P", protocol, "--no_daemon",
                     "-F", self.log_file, "-b", "127.0.0.1",
                     "-l", str(self.port), "--auth_failure_delay", "0"]
        if backend_port is not None:
            self.args += ["-s", f"127.0.0.1:{backend_port}", "-M", ""]
        self.args += [str(a) for a in args]
        self.env = perdition_env(self.tmpdir)
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        """Start perdition; return once its port accepts connections."""
        with open(self.stdout_file, "wb") as out, \
                open(self.stderr_file, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self._fail(f"exited with status {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port),
                                         timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    self._fail(f"port {self.port} did not accept "
                               f"within {START_TIMEOUT} s")
                time.sleep(0.02)

    def _fail(self, why):
        raise RuntimeError(
            f"perdition {why}\ncommand: {self.args}\n"
            f"--- stderr ---\n{self.stderr()}--- log ---\n{self.log()}")

    def log(self):
        """The text of perdition's log file so far."""
        return _read(self.log_file)

    def stdout(self):
        return _read(self.stdout_file)

    def stderr(self):
        return _read(self.stderr_file)

    def wait_for_log(self, substring, timeout=5, count=1):
        """Return the log once it contains *substring* (*count* times); fail
        after *timeout* seconds, since perdition may write a line after the
        client sees the reply it concerns."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if text.count(substring) >= count:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{substring!r} not in perdition's log after {timeout} s:"
                    f"\n{text}")
            time.sleep(0.02)

    def reload(self, timeout=10):
        """SIGHUP perdition; return the log once it has one more line
        saying how a reload went ("Reloaded: ..." or "Reload failed")."""
        before = _reloads(self.log())
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while _reloads(self.log()) == before:
            if time.monotonic() > deadline:
                raise AssertionError(f"no reload logged after SIGHUP in "
                                     f"{timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return self.log()

    def stop(self):
        """SIGTERM perdition, then SIGKILL if it has not exited in time.

        Returns its exit status.
        """
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


def _reloads(log):
    return log.count("]: Reloaded: ") + log.count("]: Reload failed")


def wait_until(predicate, timeout=TIMEOUT, what="condition"):
    """Poll *predicate* until it is true; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("%s not met within %s s" % (what, timeout))
        time.sleep(0.02)


def run_perdition(args, timeout=10, tmpdir=None):
    """Run ``perdition.py ARGS`` to completion, e.g. to see it refuse a bad
    command line; a perdition that keeps running raises TimeoutExpired."""
    tmpdir = tmpdir or tempfile.mkdtemp(prefix="perdition-")
    return subprocess.run([sys.executable, PERDITION, *map(str, args)],
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout,
                          env=perdition_env(os.fspath(tmpdir)))


def imap_connect(port):
    return imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)


def pop3_connect(port):
    return poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)


class RawClient:
    """A line-oriented TCP client for checking protocol details byte by
    byte, where imaplib and poplib would hide or reject them.

    Every read gives up after its timeout with TimeoutError; at end of file
    readline() returns what is left, b"" once nothing is.
    """

    def __init__(self, port, host="127.0.0.1", timeout=TIMEOUT, source=None):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=source)
        self.timeout = timeout
        self.buffer = b""

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self, deadline):
        """Read more into the buffer; False at end of file."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete reply; got {self.buffer!r}")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError(
                f"no complete reply; got {self.buffer!r}") from None
        self.buffer += data
        return bool(data)

    def read_until(self, marker, timeout=None):
        """Return everything up to and including *marker*.

        At end of file without *marker*, return what was received.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        while marker not in self.buffer:
            if not self._fill(deadline):
                data, self.buffer = self.buffer, b""
                return data
        end = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def readline(self, timeout=None):
        """One line, with its line ending."""
        return self.read_until(b"\n", timeout)

    def starttls(self, context, server_hostname="localhost"):
        """Switch the connection to TLS: after STARTTLS or STLS, or at once
        on an implicit-TLS port."""
        if self.buffer:
            raise AssertionError(f"plaintext after the TLS go-ahead: "
                                 f"{self.buffer!r}")
        self.sock = context.wrap_socket(self.sock,
                                        server_hostname=server_hostname)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
