#!/usr/bin/env python3
"""Benchmark perdition side by side with the back-end it proxies.

Every workload runs first directly against the real server, then through
perdition (and, with --other-proxy, through another proxy), one after the
other in the same run, and the table gives each figure with its ratio to
direct.  The workloads are the ones of issue 5: full login sessions, bulk
fetches of ~100 MiB in plaintext and TLS, NOOP round trips, and thousands of
idle logged-in sessions.  See README.md beside this file.

The clients use raw sockets with TCP_NODELAY rather than imaplib or poplib:
their per-line overhead would otherwise be counted as the servers' time.
Standard library only.  Every loop is bounded in count and time; the only
processes ended are the ones this script started, by their PIDs.
"""

import argparse
import base64
import itertools
import json
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PERDITION = os.path.join(ROOT, "perdition.py")
LIGHTIMAP = os.path.join(HERE, "lightimap.py")

MiB = 1 << 20
GiB = 1 << 30
IO_TIMEOUT = 10.0       # any single socket operation
START_TIMEOUT = 15.0    # a proxy's listening port must accept by then
STOP_TIMEOUT = 10.0
RECV_SIZE = 256 * 1024
LITERAL = re.compile(rb"\{(\d+)\}\r\n\Z")
POP3_END = b"\r\n.\r\n"
WORKLOADS = ("logins", "bulk", "noop", "idle")     # in the order they run

# -f '': no configuration file, whatever the machine has in /etc/perdition;
# --pid_file '': none in the machine's /var/run.
PERDITION_TEMPLATE = (
    "{python} {perdition} -f '' --pid_file '' -P {protocol} --no_daemon "
    "-F {log_file} "
    "-b 127.0.0.1 -l {listen_port} -s 127.0.0.1:{backend_port} -M '' "
    "-u root -g root {ssl_args}")
PERDITION_PROTOCOLS = {("IMAP", False): "IMAP4", ("IMAP", True): "IMAP4S",
                       ("POP3", False): "POP3", ("POP3", True): "POP3S"}


class ProtocolError(Exception):
    """The server answered something other than success."""


class Skipped(Exception):
    """A target is left out of a measurement; the reason was reported once."""


# --- clients -----------------------------------------------------------------

class Conn:
    """One client connection: TCP_NODELAY, optional TLS, a small line reader."""

    greeting = b""

    def __init__(self, port, context=None, timeout=IO_TIMEOUT):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect(("127.0.0.1", port))
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buf = bytearray()

    def __enter__(self):
        self.greet()
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        self.sock.close()

    def greet(self):
        line = self.readline()
        if not line.startswith(self.greeting):
            raise ProtocolError(f"greeting {line!r}")

    def readline(self):
        while (i := self.buf.find(b"\n")) < 0:
            self._fill()
        line = bytes(self.buf[:i + 1])
        del self.buf[:i + 1]
        return line

    def _fill(self):
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise ConnectionError("connection closed by the server")
        self.buf += data

    def skip(self, n):
        """Consume *n* bytes without keeping them: the buffer first, then the
        socket straight into a scratch buffer, never past the *n*th byte."""
        taken = min(n, len(self.buf))
        del self.buf[:taken]
        n -= taken
        scratch = memoryview(bytearray(min(n, RECV_SIZE)))
        while n:
            got = self.sock.recv_into(scratch, min(n, RECV_SIZE))
            if not got:
                raise ConnectionError("connection closed inside a literal")
            n -= got


class ImapConn(Conn):
    greeting = b"* OK"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tags = (b"a%d" % n for n in itertools.count())

    def send_command(self, command):
        """Send *command*; return its tag for reply()."""
        tag = next(self.tags)
        self.sock.sendall(b"%s %s\r\n" % (tag, command))
        return tag

    def reply(self, tag):
        """Read to the tagged line of *tag*; literals in between are drained.
        Returns the octets of literal data drained."""
        prefix = tag + b" "
        octets = 0
        while not (line := self.readline()).startswith(prefix):
            if (m := LITERAL.search(line)):
                octets += int(m.group(1))
                self.skip(int(m.group(1)))
        if not line.startswith(prefix + b"OK"):
            raise ProtocolError(line)
        return octets

    def command(self, command):
        return self.reply(self.send_command(command))

    def login(self, user, password):
        self.command(b"LOGIN %s %s" % (user, password))

    def noop(self):
        self.command(b"NOOP")

    def logout(self):
        self.command(b"LOGOUT")

    def open_mailbox(self):
        self.command(b"EXAMINE INBOX")

    def fetch_all(self):
        """Fetch every message whole; return the octets received."""
        return self.command(b"FETCH 1:* BODY.PEEK[]")


class Pop3Conn(Conn):
    greeting = b"+OK"

    def command(self, command):
        self.sock.sendall(command + b"\r\n")
        line = self.readline()
        if not line.startswith(b"+OK"):
            raise ProtocolError(line)
        return line

    def login(self, user, password):
        self.command(b"USER " + user)
        self.command(b"PASS " + password)

    def noop(self):
        self.command(b"NOOP")

    def logout(self):
        self.command(b"QUIT")

    def open_mailbox(self):
        self.messages = int(self.command(b"STAT").split()[1])

    def fetch_all(self):
        """RETR every message in turn; return the octets received."""
        return sum(self.multiline(b"RETR %d" % n)
                   for n in range(1, self.messages + 1))

    def multiline(self, command):
        """Send *command* and drain its dot-terminated answer; return its size.

        The status line's CRLF starts the search, so an empty answer's
        terminating "." line is found too; only a 4-byte tail is carried from
        one chunk to the next."""
        self.command(command)
        data, self.buf = bytes(self.buf), bytearray()
        tail, octets = b"\r\n", 0
        while True:
            if not data:
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    raise ConnectionError("connection closed inside RETR")
            i = (tail + data[:4]).find(POP3_END)
            if i >= 0:
                end = i + len(POP3_END) - len(tail)
            else:
                end = data.find(POP3_END)
                end = end + len(POP3_END) if end >= 0 else -1
            if end >= 0:
                self.buf += data[end:]
                return octets + end
            octets += len(data)
            tail, data = (tail + data)[-4:], b""


CLIENTS = {"IMAP": ImapConn, "POP3": Pop3Conn}


# --- processes under test ----------------------------------------------------

def proc_tree(root):
    """PIDs of *root* and all its descendants (a forking proxy's children)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = proc_stat(int(entry))
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def proc_stat(pid):
    """/proc/PID/stat fields from the state on (index 0 is field 3)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


class Proxy:
    """A proxy started as our child from a command template; ended by PID."""

    def __init__(self, template, workdir, protocol, tls, backend_port, backend):
        self.port = free_port()
        self.log_file = os.path.join(
            workdir, f"proxy-{self.port}-{protocol}{'-tls' if tls else ''}.log")
        ssl_args = ""
        if tls:
            ssl_args = shlex.join([
                "--ssl_mode", "ssl_all", "--ssl_cert_file", backend.cert_file,
                "--ssl_key_file", backend.key_file,
                "--ssl_ca_file", backend.cert_file])
        q = shlex.quote
        self.argv = shlex.split(template.format(
            python=q(sys.executable), perdition=q(PERDITION),
            protocol=PERDITION_PROTOCOLS[protocol, tls],
            listen_port=self.port, backend_port=backend_port,
            log_file=q(self.log_file), ssl_args=ssl_args,
            cert_file=q(backend.cert_file or ""),
            key_file=q(backend.key_file or "")))
        self.proc = None

    def start(self):
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}: "
                                   f"{shlex.join(self.argv)}\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"proxy never listened: {shlex.join(self.argv)}"
                                       f"\n{self.log_tail()}") from None
                time.sleep(0.02)

    def stop(self):
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def log_tail(self, lines=20):
        with open(self.log_file, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def cpu_seconds(self):
        """User+system time of the proxy and its descendants, including
        children already reaped (cutime, cstime)."""
        ticks = 0
        for pid in proc_tree(self.proc.pid):
            try:
                ticks += sum(int(x) for x in proc_stat(pid)[11:15])
            except OSError:
                pass
        return ticks / os.sysconf("SC_CLK_TCK")

    def pss_kib(self):
        """Proportional set size of the proxy and its descendants."""
        total = 0
        for pid in proc_tree(self.proc.pid):
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    total += sum(int(line.split()[1]) for line in f
                                 if line.startswith("Pss:"))
            except OSError:
                pass
        return total


class Target:
    """Where a workload is sent: the back-end itself (template None) or a
    proxy started in front of it for the length of one comparison."""

    def __init__(self, name, template=None):
        self.name, self.template = name, template
        self.broken = False

    def start(self, workdir, backend, protocol, tls, backend_port):
        """Return (port, proxy) to measure; proxy is None for direct.
        A proxy that failed to start once is not tried again."""
        if self.template is None:
            return backend_port, None
        if self.broken:
            raise Skipped()
        proxy = Proxy(self.template, workdir, protocol, tls, backend_port, backend)
        try:
            proxy.start()
        except RuntimeError:
            self.broken = True
            raise
        return proxy.port, proxy


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- back-ends ---------------------------------------------------------------

class Backend:
    """The real server: its ports, users and the certificate for TLS legs."""

    def __init__(self, imap_port, pop3_port, imaps_port=None, pop3s_port=None,
                 cert_file=None, key_file=None, users=(), bulk=None):
        self.ports = {("IMAP", False): imap_port, ("POP3", False): pop3_port,
                      ("IMAP", True): imaps_port, ("POP3", True): pop3s_port}
        self.cert_file, self.key_file = cert_file, key_file
        self.users = [(u.encode(), p.encode()) for u, p in users]
        self.bulk = tuple(s.encode() for s in bulk)

    def client_context(self):
        return ssl.create_default_context(cafile=self.cert_file)


def bulk_message(n, body):
    head = (f"From: bench@example.org\r\nTo: bulk@example.org\r\n"
            f"Subject: bulk message {n}\r\nMessage-ID: <bulk{n}@bench>\r\n"
            f"Content-Type: application/octet-stream\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n")
    return head.encode() + body


def bulk_body(size):
    """~*size* octets of base64 lines, like an attachment (no dot-stuffing)."""
    raw = os.urandom(size * 3 // 4)
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")


def numbered_users(n):
    """user1..userN with passwords pw1..pwN: many users, as an ISP has."""
    return [(f"user{i}", f"pw{i}") for i in range(1, n + 1)]


def private_dovecot(workdir, args):
    """Start a Dovecot of our own with user1..userN and a bulk mailbox."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from dovecot import Dovecot   # the test suite's private Dovecot
    logins = numbered_users(args.users)
    dovecot = Dovecot(os.path.join(workdir, "dovecot"),
                      users=dict(logins + [(args.bulk_user, args.bulk_password)]))
    body = bulk_body(MiB)
    for n in range(args.bulk_mib):
        dovecot.add_message(args.bulk_user, bulk_message(n, body))
    dovecot.start()
    backend = Backend(dovecot.imap_port, dovecot.pop3_port, dovecot.imaps_port,
                      dovecot.pop3s_port, dovecot.cert_file, dovecot.key_file,
                      logins, (args.bulk_user, args.bulk_password))
    return dovecot, backend


class LightImap:
    """bench/lightimap.py as our child: a back-end for thousands of sessions."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, LIGHTIMAP],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc_info):
        self.proc.stdin.close()     # it exits when its stdin closes
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


# --- workloads ---------------------------------------------------------------

def percentile(values, q, scale=1):
    """The *q* quantile of *values* (nearest rank) times *scale*; None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return scale * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def logins(client, port, users, concurrency, duration, max_sessions):
    """Full sessions (connect, greeting, login, logout) from *concurrency*
    threads until *duration* seconds or *max_sessions* have passed."""
    latencies, errors = [], []
    numbers = itertools.count()
    deadline = time.monotonic() + duration

    def worker():
        while time.monotonic() < deadline and (n := next(numbers)) < max_sessions:
            user, password = users[n % len(users)]
            started = time.perf_counter()
            try:
                with client(port) as conn:
                    conn.login(user, password)
                    conn.logout()
            except (OSError, ProtocolError) as exc:
                errors.append(repr(exc))
                return
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors,
            "elapsed": time.perf_counter() - started}


def login_sessions(client, users, concurrency, duration, max_sessions):
    def measure(port, proxy):
        return logins(client, port, users, concurrency, duration, max_sessions)
    return measure


def merge_logins(parts, cpu):
    latencies = [x for part in parts for x in part["latencies"]]
    errors = [e for part in parts for e in part["errors"]]
    result = {"per_s": len(latencies) / sum(part["elapsed"] for part in parts),
              "sessions": len(latencies),
              "p50_ms": percentile(latencies, 0.5, 1e3),
              "p99_ms": percentile(latencies, 0.99, 1e3),
              "errors": errors[:3], "error_count": len(errors)}
    if cpu is not None:
        result["proxy_cpu_ms_per_login"] = 1e3 * cpu / max(len(latencies), 1)
    return result


def bulk_fetch(backend, client, tls):
    """The bulk user fetches its whole mailbox once; only the fetch is timed."""
    def fetch(port, proxy):
        context = backend.client_context() if tls else None
        with client(port, context) as conn:
            conn.login(*backend.bulk)
            conn.open_mailbox()
            started = time.perf_counter()
            octets = conn.fetch_all()
            elapsed = time.perf_counter() - started
            conn.logout()
        return {"octets": octets, "seconds": elapsed}
    return fetch


def merge_bulk(parts, cpu):
    rates = [part["octets"] / MiB / part["seconds"] for part in parts]
    octets = sum(part["octets"] for part in parts)
    result = {"mib_s": statistics.median(rates), "rates": rates, "octets": octets}
    if cpu is not None:
        result["cpu_s_per_gib"] = cpu / (octets / GiB)
    return result


def noop_pingpong(backend, client, count, duration):
    """NOOP ping-pong in one logged-in session, after 100 unrecorded ones."""
    def pingpong(port, proxy):
        with client(port) as conn:
            conn.login(*backend.users[0])
            for _ in range(100):
                conn.noop()
            samples = []
            deadline = time.monotonic() + duration
            while len(samples) < count and time.monotonic() < deadline:
                started = time.perf_counter_ns()
                conn.noop()
                samples.append(time.perf_counter_ns() - started)
            conn.logout()
        return samples
    return pingpong


def merge_noop(parts, cpu):
    samples = [x for part in parts for x in part]
    return {"p50_us": percentile(samples, 0.5, 1e-3),
            "p99_us": percentile(samples, 0.99, 1e-3), "count": len(samples)}


def open_batch(port, count, conns):
    """Open *count* IMAP sessions with their handshakes overlapping; append
    the ones that logged in to *conns* and close the rest."""
    batch, done = [], []
    try:
        for _ in range(count):
            batch.append(ImapConn(port))
        for conn in batch:
            conn.greet()
        tags = [conn.send_command(b"LOGIN idle secret") for conn in batch]
        for conn, tag in zip(batch, tags):
            conn.reply(tag)
            done.append(conn)
    finally:
        conns.extend(done)
        for conn in batch[len(done):]:
            conn.close()


def count_answering(conns, deadline):
    """How many of *conns* answer a NOOP (until *deadline*)."""
    held = 0
    for conn in conns:
        if time.monotonic() > deadline:
            break
        try:
            conn.noop()
            held += 1
        except (OSError, ProtocolError):
            conn.sock.settimeout(1)   # others may be as dead: fail fast
    return held


def idle_sessions(sessions, timeout):
    """Open *sessions* logged-in IMAP sessions, 64 handshakes at a time,
    stopping at the first failure; then NOOP each and count the ones that
    answer as held.  The proxy's PSS is taken before and with them open."""
    def hold(port, proxy):
        base = proxy.pss_kib() if proxy else None
        deadline = time.monotonic() + timeout
        conns, error = [], None
        started = time.perf_counter()
        try:
            while len(conns) < sessions and time.monotonic() < deadline:
                open_batch(port, min(64, sessions - len(conns)), conns)
        except (OSError, ProtocolError) as exc:
            error = f"after {len(conns)} sessions: {exc!r}"
        result = {"opened_s": time.perf_counter() - started, "error": error}
        time.sleep(0.5)
        result["held"] = held = count_answering(conns, deadline)
        if proxy:
            time.sleep(0.2)
            pss = proxy.pss_kib()
            result.update(pss_kib_base=base, pss_kib=pss,
                          pss_kib_per_session=(pss - base) / max(held, 1))
        for conn in conns:
            conn.close()
        return result
    return hold


# --- the run -----------------------------------------------------------------

class Run:
    """One run: the comparisons of every workload, and the table's rows."""

    def __init__(self, args, backend, targets, workdir):
        self.args, self.backend, self.targets = args, backend, targets
        self.workdir = workdir
        self.rows, self.errors, self.details = [], [], {}

    def compare(self, protocol, tls, backend_port, measure, merge, rounds,
                warmup=True):
        """Measure every target with measure(port, proxy).

        All targets are started together and measured in turn, *rounds*
        times after one unrecorded warm-up round, so that the machine's
        drift falls on all of them alike.  merge(parts, proxy_cpu_seconds)
        makes each target's result; a target that fails gets None."""
        label = f"{protocol}{' TLS' if tls else ''}"
        live, parts, cpu, failed = {}, {}, {}, set()
        try:
            for target in self.targets:
                try:
                    live[target.name] = target.start(
                        self.workdir, self.backend, protocol, tls, backend_port)
                    parts[target.name] = []
                except Skipped:
                    pass
                except Exception as exc:
                    self.errors.append(f"{target.name} {label}: {exc}")
            for n in range(rounds + warmup):
                for name, (port, proxy) in live.items():
                    if name in failed:
                        continue
                    if n == warmup and proxy:
                        cpu[name] = proxy.cpu_seconds()
                    try:
                        part = measure(port, proxy)
                    except Exception as exc:
                        self.errors.append(f"{name} {label}: {exc!r}")
                        failed.add(name)
                        continue
                    if n >= warmup:
                        parts[name].append(part)
            time.sleep(0.1)     # let the proxies account for the last sessions
            results = dict.fromkeys(t.name for t in self.targets)
            for name, (port, proxy) in live.items():
                if name not in failed:
                    used = proxy.cpu_seconds() - cpu[name] if proxy else None
                    results[name] = merge(parts[name], used)
            return results
        finally:
            for port, proxy in live.values():
                if proxy:
                    proxy.stop()

    def record(self, name, results, spec):
        """Keep *results* and add the table rows *spec*: [(label, key)]."""
        self.details[name] = results
        self.rows.extend(rows_from(results, spec))
        for target, result in results.items():
            if result and (result.get("error_count") or result.get("error")):
                self.errors.append(f"{target} {name}: "
                                   f"{result.get('error') or result['errors']}")
        print(f"done: {name}", file=sys.stderr, flush=True)

    def logins(self):
        args = self.args
        for protocol, client in CLIENTS.items():
            for c in args.concurrency:
                measure = login_sessions(client, self.backend.users, c,
                                         args.duration / args.rounds,
                                         args.max_sessions // args.rounds)
                results = self.compare(protocol, False,
                                       self.backend.ports[protocol, False],
                                       measure, merge_logins, args.rounds)
                self.record(f"{protocol} logins c={c}", results, [
                    (f"{protocol} logins/s c={c}", "per_s"),
                    (f"{protocol} login p50 ms c={c}", "p50_ms"),
                    (f"{protocol} login p99 ms c={c}", "p99_ms")])

    def bulk(self):
        for protocol, client in CLIENTS.items():
            for tls in (False, True):
                port = self.backend.ports[protocol, tls]
                if port is None:
                    self.errors.append(f"{protocol} TLS bulk skipped: "
                                       "no TLS port or certificate")
                    continue
                kind = "TLS" if tls else "plain"
                results = self.compare(protocol, tls, port,
                                       bulk_fetch(self.backend, client, tls),
                                       merge_bulk, self.args.rounds)
                self.record(f"{protocol} bulk {kind}", results, [
                    (f"{protocol} bulk {kind} MiB/s", "mib_s"),
                    (f"{protocol} bulk {kind} proxy CPU s/GiB", "cpu_s_per_gib")])

    def noop(self):
        args = self.args
        for protocol, client in CLIENTS.items():
            measure = noop_pingpong(self.backend, client, args.noops // args.rounds,
                                    args.duration / args.rounds)
            results = self.compare(protocol, False,
                                   self.backend.ports[protocol, False],
                                   measure, merge_noop, args.rounds)
            self.record(f"{protocol} NOOP", results, [
                (f"{protocol} NOOP p50 us", "p50_us"),
                (f"{protocol} NOOP p99 us", "p99_us")])

    def idle(self):
        n = self.args.idle_sessions
        with LightImap() as light:
            # One round, no warm-up: a warm-up's freed memory would hide
            # in the baseline.
            results = self.compare(
                "IMAP", False, light.port,
                idle_sessions(n, self.args.idle_timeout),
                lambda parts, cpu: parts[0], rounds=1, warmup=False)
        self.record("idle", results, [
            (f"idle IMAP sessions held (of {n})", "held"),
            ("idle proxy PSS KiB/session", "pss_kib_per_session")])


def rows_from(results, spec):
    """[(label, {target: value})] from results and [(label, key)]."""
    return [(label, {name: (r or {}).get(key) for name, r in results.items()})
            for label, key in spec]


def fmt(value):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def ratio(value, direct):
    return value / direct if value is not None and direct else None


def print_table(rows, names, out=sys.stdout):
    """workload | direct | proxy | ratio [| proxy | ratio]..."""
    header = ["workload", names[0]]
    for name in names[1:]:
        header += [name, "ratio"]
    table = [header]
    for label, values in rows:
        direct = values.get(names[0])
        line = [label, fmt(direct)]
        for name in names[1:]:
            r = ratio(values.get(name), direct)
            line += [fmt(values.get(name)), "-" if r is None else f"{r:.2f}x"]
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for n, line in enumerate(table):
        print("  ".join([line[0].ljust(widths[0])] +
                        [c.rjust(w) for c, w in zip(line[1:], widths[1:])]), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a short run (about a minute): shorter, smaller workloads")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--keep", action="store_true",
                   help="keep the working directory (proxy and Dovecot logs)")
    p.add_argument("--other-proxy", metavar="CMD",
                   help="also measure this proxy; a template with {listen_port} "
                        "{backend_port} {protocol} {ssl_args} {log_file} {cert_file} "
                        "{key_file} (see README.md)")
    p.add_argument("--other-name", default="other", help="column name for --other-proxy")
    p.add_argument("--no-perdition", action="store_true",
                   help="leave perdition out (to check the harness or another proxy)")
    p.add_argument("--workloads", default="logins,bulk,noop,idle",
                   help="which workloads to run, comma-separated (default all: "
                        "logins,bulk,noop,idle)")
    p.add_argument("--concurrency", default="1,16,32",
                   help="login concurrencies, comma-separated (default 1,16,32)")
    p.add_argument("--duration", type=float, help="recorded seconds per target "
                   "of each login and NOOP measurement (default 3, quick 1)")
    p.add_argument("--rounds", type=int, help="the targets take turns this many "
                   "times per measurement, after a warm-up turn; a bulk round is "
                   "one fetch (default 3, quick 2)")
    p.add_argument("--max-sessions", type=int, default=100_000,
                   help="login sessions per measurement at most")
    p.add_argument("--noops", type=int, default=20_000, help="NOOPs per measurement at most")
    p.add_argument("--bulk-mib", type=int,
                   help="MiB of mail in the bulk mailbox (1 MiB messages; default 100, "
                        "quick 32); ignored with --imap-port")
    p.add_argument("--idle-sessions", type=int,
                   help="idle sessions to hold (default 2000, quick 500; 0 skips; up "
                        "to 8000 fits the default file-descriptor limits)")
    p.add_argument("--idle-timeout", type=float, default=180,
                   help="seconds the idle measurement may take at most")
    g = p.add_argument_group("an existing back-end instead of a private Dovecot")
    g.add_argument("--imap-port", type=int)
    g.add_argument("--pop3-port", type=int)
    g.add_argument("--imaps-port", type=int)
    g.add_argument("--pop3s-port", type=int)
    g.add_argument("--cert-file", help="certificate and key for the proxy's TLS "
                   "listener; also the CA that the back-end's certificate verifies against")
    g.add_argument("--key-file")
    p.add_argument("--users", type=int, default=200,
                   help="log in as user1..userN with passwords pw1..pwN (default 200)")
    p.add_argument("--bulk-user", default="bulk")
    p.add_argument("--bulk-password", default="bulkpw")
    args = p.parse_args(argv)
    if (args.imap_port is None) != (args.pop3_port is None):
        p.error("--imap-port and --pop3-port go together")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    chosen = set(args.workloads.split(","))
    if chosen - set(WORKLOADS):
        p.error(f"--workloads: choose from {','.join(WORKLOADS)}")
    quick = args.quick
    defaults = {"duration": (3.0, 1.0), "bulk_mib": (100, 32), "rounds": (3, 2),
                "idle_sessions": (2000, 500)}
    for name, (normal, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else normal)
    if not args.idle_sessions:
        chosen.discard("idle")
    args.workloads = [w for w in WORKLOADS if w in chosen]
    return args


def main(argv=None):
    args = parse_args(argv)
    fd_limit = raise_fd_limit()
    if 2 * args.idle_sessions + 200 > fd_limit:   # a proxy holds two per session
        print(f"warning: {args.idle_sessions} idle sessions need more than the "
              f"file-descriptor limit of {fd_limit}", file=sys.stderr)
    targets = [Target("direct")]
    if not args.no_perdition:
        if os.path.exists(PERDITION):
            targets.append(Target("perdition", PERDITION_TEMPLATE))
        else:
            print(f"warning: {PERDITION} not found; measuring without it",
                  file=sys.stderr)
    if args.other_proxy:
        targets.append(Target(args.other_name, args.other_proxy))
    workdir = tempfile.mkdtemp(prefix="perdition-bench-")
    try:
        dovecot = None
        if args.imap_port is None:
            dovecot, backend = private_dovecot(workdir, args)
        else:
            tls = args.cert_file and args.key_file
            backend = Backend(args.imap_port, args.pop3_port,
                              args.imaps_port if tls else None,
                              args.pop3s_port if tls else None,
                              args.cert_file, args.key_file,
                              numbered_users(args.users),
                              (args.bulk_user, args.bulk_password))
        started = time.monotonic()
        run = Run(args, backend, targets, workdir)
        try:
            for workload in args.workloads:
                getattr(run, workload)()
        finally:
            if dovecot:
                dovecot.stop()
    finally:
        if args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    names = [t.name for t in targets]
    rows, errors = run.rows, run.errors
    if args.json:
        json.dump({
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "kernel": platform.release(), "fd_limit": fd_limit},
            "settings": {k: v for k, v in vars(args).items()},
            "seconds": time.monotonic() - started,
            "rows": [{"workload": label, "values": values,
                      "ratios": {n: ratio(values.get(n), values.get("direct"))
                                 for n in names[1:]}}
                     for label, values in rows],
            "details": run.details, "errors": errors}, sys.stdout, indent=1)
        print()
    else:
        print_table(rows, names)
        print(f"\n{len(rows)} figures in {time.monotonic() - started:.0f} s; "
              f"{os.cpu_count()} CPUs; file-descriptor limit {fd_limit}")
        for error in errors:
            print(f"error: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
