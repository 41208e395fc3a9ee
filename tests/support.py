"""What the POP3, IMAP4 and TLS end-to-end tests share.

Dovecot is the back-end wherever it can show the behaviour; a scripted
back-end plays the servers Dovecot cannot be made into -- one that hangs,
drops the connection half-way, greets like perdition itself, misbehaves
around STARTTLS -- and keeps every byte perdition sends it, noting which
arrived inside TLS, so a test can prove what did and did not reach the
real server.  Every wait here is bounded in time.
"""

import contextlib
import itertools
import os
import random
import re
import socket
import ssl
import subprocess
import threading
import time

from dovecot import Dovecot, default_users
from helpers import TIMEOUT

__all__ = ["SPECIAL_USERS", "special_dovecot", "big_message", "wait_for_eof",
           "log_in_and_out",
           "receive_at_least", "curl", "closes", "wait_for_closes",
           "traversable", "usage", "reaped",
           "settled_usage", "wait_for_usage", "ServiceManager", "Peer",
           "ScriptedBackend"]

# ---------------------------------------------------------------------------
# The real server and its mail
# ---------------------------------------------------------------------------

# Users whose names or passwords need quoting or a literal on the way to
# the real server.
SPECIAL_USERS = {
    "quoter": 'p a"s\\s',           # space, quote and backslash
    "j\u00fcrgen": "p\u00e4ssw\u00f6rd",     # UTF-8 name and password
    "erin%example.com": "p%w*d]x",  # atom characters LIST would refuse
}


def special_dovecot(tmpdir):
    """A Dovecot with the default users and SPECIAL_USERS; Dovecot refuses
    user names outside a small ASCII set unless told otherwise."""
    return Dovecot(tmpdir, users={**default_users(), **SPECIAL_USERS},
                   extra="auth_username_chars =\n")


def big_message(size, seed):
    """An RFC 5322 message of about *size* bytes with CRLF line endings.

    The body is random hexadecimal text, with lines that a POP3 server must
    dot-stuff (a lone '.', '..', '.x') scattered in it, so that a byte
    lost, added or reordered anywhere shows.
    """
    rng = random.Random(seed)
    lines = [b"From: bob@localhost", b"To: alice@localhost",
             b"Subject: big message %d" % seed, b""]
    total = 0
    while total < size:
        if rng.random() < 0.01:
            line = rng.choice([b".", b"..", b".dot", b". space"])
        else:
            line = rng.randbytes(rng.randrange(1, 58)).hex().encode()
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n"


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

def wait_for_eof(client, timeout=TIMEOUT, reset=False):
    """Return what *client* (a RawClient) receives until the other side
    closes; fail if it is still open after *timeout* seconds.  With
    *reset*, a reset or a TLS error also counts as the end."""
    deadline = time.monotonic() + timeout
    data, client.buffer = bytearray(client.buffer), b""
    while True:
        client.sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = client.sock.recv(65536)
        except socket.timeout:
            raise AssertionError(f"still open after {timeout} s; received "
                                 f"{bytes(data[-200:])!r}") from None
        except (ConnectionResetError, ssl.SSLError):
            if not reset:
                raise
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


def log_in_and_out(client, protocol, user=b"alice", password=b"alicepw"):
    """On a greeted RawClient, log in (IMAP LOGIN or POP3 USER/PASS) and
    out again; return the answer to the login, after the end."""
    if protocol.startswith("IMAP"):
        client.send(b"a LOGIN %s %s\r\n" % (user, password))
        answer = client.readline()
        client.send(b"b LOGOUT\r\n")
    else:
        client.send(b"USER %s\r\n" % user)
        client.readline()
        client.send(b"PASS %s\r\n" % password)
        answer = client.readline()
        client.send(b"QUIT\r\n")
    wait_for_eof(client)
    return answer


def receive_at_least(client, size):
    """Read *size* bytes or more of what *client* (a RawClient) is sent,
    and leave the rest unread; fail if the other side closes first."""
    got = len(client.buffer)
    while got < size:
        chunk = client.sock.recv(65536)
        assert chunk, f"closed after {got} bytes"
        got += len(chunk)


def curl(*args):
    """Run curl with *args*; return its standard output (bytes)."""
    result = subprocess.run(["curl", "--silent", "--show-error",
                             "--max-time", str(TIMEOUT), *map(str, args)],
                            capture_output=True, timeout=TIMEOUT + 5)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


# ---------------------------------------------------------------------------
# perdition's log, threads and file descriptors
# ---------------------------------------------------------------------------

def closes(proxy, user):
    """(received, sent) of each of *user*'s Close lines in the log so far."""
    found = re.findall(r'Close: 127\.0\.0\.1 user="%s" received=(\d+) '
                       r'sent=(\d+)$' % re.escape(user), proxy.log(), re.M)
    return [tuple(map(int, pair)) for pair in found]


def wait_for_closes(proxy, user, count, timeout=5):
    """closes() once there are *count* of them: perdition logs a Close
    after the client has seen the end."""
    deadline = time.monotonic() + timeout
    while True:
        found = closes(proxy, user)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} Close lines of {user}, not "
                                 f"{count}, after {timeout} s")
        time.sleep(0.05)


def traversable(path):
    """Let others pass through *path* and its ancestors, as they can
    through /var/run and /var/log: perdition, no longer root, removes its
    pid file and looks at its log file there."""
    path = os.path.abspath(path)
    while path != "/":
        os.chmod(path, os.stat(path).st_mode | 0o011)
        path = os.path.dirname(path)


@contextlib.contextmanager
def reaped(proc):
    """A process the block expects to end by itself: killed and reaped if
    it is still running when the block leaves (a failed assertion)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def usage(pid):
    """(threads, open file descriptors) of process *pid*."""
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f
                       if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def _sessions_open(perdition):
    log = perdition.log()
    return log.count("]: Connect: ") - log.count("]: Close: ")


def settled_usage(perdition, timeout=5):
    """usage() once every session perdition logged has closed and the
    counts have stopped moving: the baseline to come back to."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        now = usage(perdition.pid)
        if now == last and not _sessions_open(perdition):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"perdition did not settle: usage {now}, "
                                 f"{_sessions_open(perdition)} sessions open")
        last = now
        time.sleep(0.1)


def wait_for_usage(perdition, baseline, timeout=10):
    """Wait until perdition uses no more threads and descriptors than
    *baseline*; fail with what it holds after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = usage(perdition.pid)
        if all(n <= b for n, b in zip(now, baseline)):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(
                f"(threads, fds) {now} still above the baseline {baseline} "
                f"after {timeout} s; descriptors: "
                f"{os.listdir(f'/proc/{perdition.pid}/fd')}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------
# The service manager's side
# ---------------------------------------------------------------------------

_managers = itertools.count(1)


class ServiceManager:
    """The service manager's end of sd_notify: a datagram socket for
    perdition's NOTIFY_SOCKET (`address`), in the abstract namespace
    ('@name') or, given *directory*, a socket file there that the user
    perdition drops to may write to."""

    def __init__(self, directory=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if directory is None:
            self.address = "@perdition-test-%d-%d" % (os.getpid(),
                                                       next(_managers))
            self.sock.bind("\0" + self.address[1:])
        else:
            self.address = os.path.join(os.fspath(directory), "notify")
            self.sock.bind(self.address)
            os.chmod(self.address, 0o666)
        self.messages = []

    def wait_for(self, state, timeout=TIMEOUT):
        """Receive until a message holds the line *state* (e.g.
        "READY=1"); return that message's lines.  Messages received so
        far are in `messages`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {state!r} within {timeout} s; "
                                     f"received {self.messages}")
            self.sock.settimeout(left)
            try:
                lines = self.sock.recv(4096).decode().split("\n")
            except socket.timeout:
                continue
            self.messages.append(lines)
            if state in lines:
                return lines

    def close(self):
        self.sock.close()
        if not self.address.startswith("@"):
            os.unlink(self.address)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# ---------------------------------------------------------------------------
# A scripted back-end
# ---------------------------------------------------------------------------

class Peer:
    """The scripted server's end of one connection.

    Everything received is kept in `received`, and what of it arrived
    inside TLS also in `secure`.  `cipher` is the TLS cipher once
    start_tls() has made one, `error` the exception that ended the script,
    if any (EOFError when the other side closed first), and `result` is
    the script's to leave an outcome in for the test.
    """

    def __init__(self, sock):
        self.sock = sock
        self.tls = False
        self.buffer = b""
        self.received = bytearray()
        self.secure = bytearray()
        self.cipher = None
        self.error = None
        self.result = None
        self.thread = None

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.received += data
        if self.tls:
            self.secure += data
        self.buffer += data

    def readline(self):
        """One line with its ending; EOFError at the end of input."""
        while b"\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def read_exact(self, size):
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_to_end(self):
        """Read (and keep) everything until the other side closes."""
        try:
            while True:
                self._fill()
        except EOFError:
            pass

    def start_tls(self, context):
        """Handshake as the server with the ssl.SSLContext *context*; what
        came before it counts for nothing, as in any careful server."""
        self.buffer = b""
        self.sock = context.wrap_socket(self.sock, server_side=True)
        self.tls = True
        self.cipher = self.sock.cipher()[0]


class ScriptedBackend:
    """A server on a loopback port (*port*, or a free one): `script`, a
    function of a Peer, plays each connection in a thread of its own.

    Tests may swap `script` between connections; reset() also forgets the
    connections so far.
    """

    def __init__(self, script, port=0):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.peers = []         # since the last reset()
        self.every_peer = []
        self.stopping = threading.Event()
        self._listing = threading.Lock()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            sock.settimeout(TIMEOUT)
            peer = Peer(sock)
            peer.thread = threading.Thread(
                target=self._serve, args=(self.script, peer), daemon=True)
            # Listed before its script runs: a test may look at received()
            # as soon as the script has answered.
            with self._listing:
                peer.thread.start()
                self.peers.append(peer)
                self.every_peer.append(peer)

    def _serve(self, script, peer):
        with self._listing:     # until the acceptor has listed the peer
            pass
        try:
            script(peer)
        # ssl.SSLError is an OSError; ValueError: I/O on a closed socket
        except (OSError, ValueError, EOFError) as e:
            peer.error = e
        finally:
            peer.sock.close()

    def reset(self, script):
        self.script = script
        self.peers = []

    def join(self, connections):
        """Wait until *connections* connections since the last reset() have
        come and gone, so that received() is all there will be."""
        deadline = time.monotonic() + TIMEOUT
        while len(self.peers) < connections:
            assert time.monotonic() < deadline, \
                f"{len(self.peers)} connections, not {connections}"
            time.sleep(0.02)
        for peer in self.peers:
            peer.thread.join(TIMEOUT)
            assert not peer.thread.is_alive(), "a connection is still open"

    def received(self):
        """Everything every connection since the last reset() received."""
        return b"".join(bytes(peer.received) for peer in self.peers)

    def close(self):
        self.stopping.set()
        self.acceptor.join(TIMEOUT)
        self.listener.close()
        for peer in self.every_peer:    # ends the scripts that still read
            try:
                peer.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            peer.thread.join(TIMEOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
