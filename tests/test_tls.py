"""SSL and TLS on both sides of perdition (issue 4), end to end.

perdition runs as a real process between real clients -- curl, openssl
s_client, imaplib and poplib -- and a real Dovecot, in every --ssl_mode.
The module is its own certificate authority: the certificates for every
verification case (wrong name, expired, not yet valid, self-signed, unknown
CA, long chain, expired or not yet valid CA) are made once, and one Dovecot
serves each of them on a loopback address of its own (Dovecot's `local`
blocks choose the certificate by the address connected to).

Where a test needs a server that misbehaves -- one that offers no STARTTLS,
injects responses, greets with PREAUTH, speaks only TLS 1.2 with one cipher
or streams bulk data both ways at once -- a scripted back-end in this
process plays it and records every byte it receives, so that the test can
prove what perdition did and did not send.
"""

import imaplib
import itertools
import os
import poplib
import pwd
import random
import re
import select
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dovecot import Dovecot, free_port
from helpers import (PERDITION, Perdition, RawClient, TIMEOUT, imap_connect,
                     perdition_env, pop3_connect, readable_copy,
                     run_perdition)
from support import ScriptedBackend, wait_for_eof

sys.path.insert(0, os.path.dirname(PERDITION))
import perdition  # noqa: E402


# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------

# Dovecot serves the certificate named here on that loopback address; the
# real servers behind perdition in the verification tests.
BACKENDS = {
    "dovecot": "127.0.0.1",             # Dovecot's own self-signed one
    "good": "127.0.0.2",
    "wrong_name": "127.0.0.3",
    "expired": "127.0.0.4",
    "not_yet_valid": "127.0.0.5",
    "self_signed": "127.0.0.6",
    "unknown_ca": "127.0.0.7",          # sends its unknown root along
    "unknown_ca_leaf": "127.0.0.8",     # sends no root
    "long_chain": "127.0.0.9",          # root, two intermediates, leaf
    "expired_ca": "127.0.0.10",         # issued by an expired intermediate
    "not_yet_valid_ca": "127.0.0.11",   # ... by one not valid yet
}
# The CA certificates each server sends after its own.
CHAINS = {"unknown_ca": ["other"], "long_chain": ["chain_ca2", "chain_ca1"],
          "expired_ca": ["old_ca"], "not_yet_valid_ca": ["new_ca"]}

CA_CONFIG = """\
[ca]
default_ca = test_ca
[test_ca]
database = {dir}/index.txt
new_certs_dir = {dir}/issued
serial = {dir}/serial
default_md = sha256
policy = any_name
unique_subject = no
[any_name]
commonName = supplied
"""
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]


def openssl(*args):
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True,
                            text=True, timeout=60)
    if result.returncode:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr}")


def stamp(days):
    """An `openssl ca` date *days* from now (negative: in the past); the
    -days option of OpenSSL 3.0 cannot make a certificate that has expired
    or is not valid yet, -startdate and -enddate can."""
    return time.strftime("%Y%m%d%H%M%SZ",
                         time.gmtime(time.time() + days * 86400))


def share(path):
    """Make *path* readable, and its ancestors passable, by the user
    perdition drops to: OpenSSL reads --ssl_ca_path on demand, after
    start-up."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXOTH)


class PKI:
    """A throw-away certificate authority and what it issues: NAME.crt and
    NAME.key in one directory, EC keys (quick to make)."""

    def __init__(self, directory):
        self.dir = os.fspath(directory)
        os.makedirs(os.path.join(self.dir, "issued"))
        open(os.path.join(self.dir, "index.txt"), "w").close()
        with open(os.path.join(self.dir, "serial"), "w") as f:
            f.write("1000\n")
        self.config = os.path.join(self.dir, "ca.cnf")
        with open(self.config, "w") as f:
            f.write(CA_CONFIG.format(dir=self.dir))

    def cert(self, name):
        return os.path.join(self.dir, name + ".crt")

    def key(self, name):
        return os.path.join(self.dir, name + ".key")

    def self_signed(self, name, san=None):
        """A root CA, or with *san* a self-signed server certificate."""
        args = ["req", "-x509", "-new", "-nodes", *EC_KEY, "-days", 3650,
                "-subj", f"/CN={name}", "-keyout", self.key(name),
                "-out", self.cert(name)]
        if san:
            args += ["-addext", f"subjectAltName={san}"]
        openssl(*args)

    def issue(self, name, issuer, san=None, start=-1, end=3650):
        """A server certificate for *san* signed by *issuer*, or without
        *san* an intermediate CA; valid from *start* to *end* days from
        now."""
        extensions = os.path.join(self.dir, name + ".ext")
        with open(extensions, "w") as f:
            f.write("subjectKeyIdentifier = hash\n"
                    "authorityKeyIdentifier = keyid\n")
            if san:
                f.write("basicConstraints = critical, CA:FALSE\n"
                        f"subjectAltName = {san}\n")
            else:
                f.write("basicConstraints = critical, CA:TRUE\n"
                        "keyUsage = critical, keyCertSign, cRLSign\n")
        request = os.path.join(self.dir, name + ".csr")
        openssl("req", "-new", "-nodes", *EC_KEY, "-subj", f"/CN={name}",
                "-keyout", self.key(name), "-out", request)
        openssl("ca", "-batch", "-notext", "-config", self.config,
                "-cert", self.cert(issuer), "-keyfile", self.key(issuer),
                "-in", request, "-out", self.cert(name), "-extfile",
                extensions, "-startdate", stamp(start), "-enddate", stamp(end))

    def bundle(self, name):
        """The certificate followed by the CA certificates its server
        sends (CHAINS)."""
        path = os.path.join(self.dir, name + ".chain.pem")
        with open(path, "w") as out:
            for part in [name] + CHAINS.get(name, []):
                with open(self.cert(part)) as f:
                    out.write(f.read())
        return path


@pytest.fixture(scope="module")
def pki():
    """Every certificate the module needs, made once.  They live outside
    pytest's base directory, which every pytest run makes private to root
    again, while perdition reads some of them as nobody."""
    directory = tempfile.mkdtemp(prefix="perdition-pki-")
    pki = PKI(os.path.join(directory, "pki"))
    pki.self_signed("root")
    pki.self_signed("other")
    local = "DNS:localhost,IP:127.0.0.1"
    pki.issue("listen", "root", local)          # perdition's own
    pki.issue("listen_ca", "root")
    pki.issue("listen_chained", "listen_ca", local)
    pki.issue("good", "root", local + ",IP:127.0.0.2")
    pki.issue("wrong_name", "root", "DNS:wrong.example,IP:192.0.2.1")
    pki.issue("expired", "root", "IP:127.0.0.4", start=-30, end=-1)
    pki.issue("not_yet_valid", "root", "IP:127.0.0.5", start=1, end=30)
    pki.self_signed("self_signed", "IP:127.0.0.6")
    pki.issue("unknown_ca", "other", "IP:127.0.0.7")
    pki.issue("unknown_ca_leaf", "other", "IP:127.0.0.8")
    pki.issue("chain_ca1", "root")
    pki.issue("chain_ca2", "chain_ca1")
    pki.issue("long_chain", "chain_ca2", "IP:127.0.0.9")
    pki.issue("old_ca", "root", start=-30, end=-1)
    pki.issue("expired_ca", "old_ca", "IP:127.0.0.10")
    pki.issue("new_ca", "root", start=1, end=30)
    pki.issue("not_yet_valid_ca", "new_ca", "IP:127.0.0.11")
    pki.capath = os.path.join(pki.dir, "capath")
    os.mkdir(pki.capath)
    shutil.copy(pki.cert("root"), pki.capath)
    openssl("rehash", pki.capath)
    share(pki.dir)
    yield pki
    shutil.rmtree(directory)


# ---------------------------------------------------------------------------
# Dovecot and perdition
# ---------------------------------------------------------------------------

def dovecot_extra(pki):
    """Dovecot configuration: every listener on every BACKENDS address,
    and each address with its certificate."""
    addresses = " ".join(BACKENDS.values())
    text = []
    for service, listeners in (("imap-login", ("imap", "imaps")),
                               ("pop3-login", ("pop3", "pop3s"))):
        text.append(f"service {service} {{\n")
        for listener in listeners:
            text.append(f"  inet_listener {listener} {{\n"
                        f"    address = {addresses}\n  }}\n")
        text.append("}\n")
    for name, address in BACKENDS.items():
        if name != "dovecot":
            text.append(f"local {address} {{\n"
                        f"  ssl_cert = <{pki.bundle(name)}\n"
                        f"  ssl_key = <{pki.key(name)}\n}}\n")
    return "".join(text)


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory, pki):
    """The module's Dovecot (in place of conftest's): the usual users, and
    a certificate per BACKENDS address."""
    with Dovecot(tmp_path_factory.mktemp("dovecot"),
                 extra=dovecot_extra(pki)) as server:
        yield server


class Proxies:
    """perdition processes shared by the module's tests, keyed by protocol
    and command line: each starts on first use and all stop at the end of
    the module."""

    def __init__(self, tmpdir):
        self.tmpdir = tmpdir
        self.running = {}

    def start(self, *specs):
        """Start those of *specs* (protocol, args...) not running yet, in
        parallel; return the perditions of all of them, in order."""
        specs = [tuple(map(str, spec)) for spec in specs]
        new = [spec for spec in dict.fromkeys(specs)
               if spec not in self.running]
        for spec in new:
            self.running[spec] = Perdition(list(spec[1:]), spec[0],
                                           self.tmpdir)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda spec: self.running[spec].start(), new))
        return [self.running[spec] for spec in specs]

    def get(self, *spec):
        return self.start(spec)[0]

    def stop(self):
        for proxy in self.running.values():
            if proxy.proc is not None:
                proxy.stop()


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    pool = Proxies(tmp_path_factory.mktemp("perdition"))
    yield pool
    pool.stop()


def listen_args(pki, cert="listen"):
    return ["--ssl_cert_file", pki.cert(cert), "--ssl_key_file",
            pki.key(cert)]


# mode: (client side, real-server side); each side is plain, ssl (TLS from
# the first byte) or starttls.
MODES = {
    "none": ("plain", "plain"),
    "ssl_listen": ("ssl", "plain"),
    "ssl_outgoing": ("plain", "ssl"),
    "ssl_all": ("ssl", "ssl"),
    "tls_listen": ("starttls", "plain"),
    "tls_outgoing": ("plain", "starttls"),
    "tls_all": ("starttls", "starttls"),
    "tls_listen_force": ("starttls", "plain"),
    "tls_outgoing_force": ("plain", "starttls"),
    "tls_all_force": ("starttls", "starttls"),
    "ssl_listen,tls_outgoing": ("ssl", "starttls"),
    "tls_listen,ssl_outgoing": ("starttls", "ssl"),
}


def mode_spec(pki, dovecot, protocol, mode, *extra, cert="listen"):
    """A perdition in front of Dovecot in *mode*: to its TLS port when the
    mode says SSL outgoing, else to its plain one."""
    ssl_port = dovecot.imaps_port if protocol == "IMAP4" \
        else dovecot.pop3s_port
    plain_port = dovecot.imap_port if protocol == "IMAP4" \
        else dovecot.pop3_port
    port = ssl_port if MODES[mode][1] == "ssl" else plain_port
    return (protocol, "--ssl_mode", mode, "-s", f"127.0.0.1:{port}", "-M", "",
            "--ssl_ca_file", dovecot.cert_file, *listen_args(pki, cert),
            *extra)


def implicit_spec(pki, dovecot, protocol):
    """IMAP4S or POP3S with its defaults, to Dovecot's TLS port."""
    port = dovecot.imaps_port if protocol == "IMAP4S" else dovecot.pop3s_port
    return (protocol, "-s", f"127.0.0.1:{port}", "-M", "", "--ssl_ca_file",
            dovecot.cert_file, *listen_args(pki))


def chooser_spec(pki, protocol, mode, *extra):
    """A perdition whose clients name the real server: user@host:port."""
    return (protocol, "-c", "-M", "", "--ssl_mode", mode, "--ssl_ca_file",
            pki.cert("root"), *listen_args(pki), *extra)


@pytest.fixture(scope="module")
def mode_proxies(proxies, pki, dovecot):
    """A perdition per protocol and mode, started together."""
    specs = {(protocol, mode): mode_spec(pki, dovecot, protocol, mode)
             for protocol in ("IMAP4", "POP3") for mode in MODES}
    return dict(zip(specs, proxies.start(*specs.values())))


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

_users = itertools.count(1)


def fresh_user():
    """A Dovecot user no other test has logged in as, so that Dovecot's
    log line for its login belongs to the calling test."""
    n = next(_users)
    return f"user{n}", f"pw{n}"


def client_context(pki, ca="root"):
    return ssl.create_default_context(cafile=pki.cert(ca))


def imap_client(port, side, context):
    if side == "ssl":
        return imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context,
                                 timeout=TIMEOUT)
    imap = imap_connect(port)
    if side == "starttls":
        imap.starttls(context)
    return imap


def pop3_client(port, side, context):
    if side == "ssl":
        return poplib.POP3_SSL("127.0.0.1", port, context=context,
                               timeout=TIMEOUT)
    pop = pop3_connect(port)
    if side == "starttls":
        pop.stls(context)
    return pop


def login_succeeds(protocol, port, user, password):
    """Log in through perdition in plaintext: True on success, False when
    perdition refuses the login (and keeps the connection)."""
    if protocol.startswith("IMAP"):
        imap = imap_connect(port)
        try:
            imap.login(user, password)
            ok = True
        except imaplib.IMAP4.abort as e:
            raise AssertionError(f"perdition dropped the connection: {e}")
        except imaplib.IMAP4.error:
            ok = False
        imap.logout()
        return ok
    pop = pop3_connect(port)
    try:
        pop.user(user)
        pop.pass_(password)
        ok = True
    except poplib.error_proto as e:
        if e.args[0] in ("-ERR EOF", b"-ERR EOF"):
            raise AssertionError("perdition dropped the connection")
        ok = False
    pop.quit()
    return ok


def dovecot_login(dovecot, user, timeout=5):
    """Dovecot's log line for *user*'s login.  It says TLS when the
    connection to Dovecot is encrypted, `secured` when it is plaintext from
    a trusted network."""
    deadline = time.monotonic() + timeout
    while True:
        for line in dovecot.log().splitlines():
            if f"Login: user=<{user}>," in line:
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"Dovecot logged no login of {user}")
        time.sleep(0.02)


def auth_lines(proxy, user):
    return [line for line in proxy.log().splitlines()
            if "Auth:" in line and f'user="{user}"' in line]


def exchange(client, tag, command):
    """Send an IMAP command; return the response lines up to the tagged
    one."""
    client.send(f"{tag} {command}\r\n".encode())
    lines = []
    while not lines or not lines[-1].startswith(tag + " "):
        line = client.readline()
        if not line:
            raise AssertionError(f"connection closed after {lines}")
        lines.append(line.decode().rstrip("\r\n"))
    return lines


def pop3_command(client, command, multiline=False):
    """Send a POP3 command; return the first response line and, for a
    multi-line response, the lines up to the '.'."""
    client.send(command.encode() + b"\r\n")
    first = client.readline().decode().rstrip("\r\n")
    lines = []
    if multiline and first.startswith("+OK"):
        while True:
            line = client.readline().decode().rstrip("\r\n")
            if line in (".", ""):
                break
            lines.append(line)
    return first, lines


def capabilities(protocol, client):
    if protocol == "IMAP4":
        lines = exchange(client, "c", "CAPABILITY")
        assert lines[-1].startswith("c OK"), lines
        [caps] = [line.split()[2:] for line in lines
                  if line.upper().startswith("* CAPABILITY ")]
        return sorted(caps)
    first, lines = pop3_command(client, "CAPA", multiline=True)
    assert first.startswith("+OK"), first
    return sorted(lines)


def start_tls(protocol, client):
    """Ask for STARTTLS (IMAP) or STLS (POP3): True if perdition agrees."""
    if protocol == "IMAP4":
        return exchange(client, "s", "STARTTLS")[-1].startswith("s OK")
    return pop3_command(client, "STLS")[0].startswith("+OK")


def duplex(sock, outgoing, done, received=b"", timeout=60):
    """Send *outgoing* on the TLS socket *sock* while reading until
    done(received) is true; return what was read.

    Both directions move at once, from this one thread: each turn writes
    what the socket takes and reads what has arrived, so no SSL object here
    is ever used by two threads.
    """
    received = bytearray(received)
    view = memoryview(outgoing)
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    try:
        while view or not done(received):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(view)} bytes unsent, "
                                   f"{len(received)} read")
            if not sock.pending():
                select.select([sock], [sock] if view else [], [],
                              min(remaining, 1))
            if not done(received):
                try:
                    data = sock.recv(65536)
                    if not data:
                        raise EOFError(f"closed after {len(received)} bytes")
                    received += data
                except ssl.SSLWantReadError:
                    pass
            if view:
                try:    # small records: many calls on perdition's side
                    view = view[sock.send(view[:4096]):]
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
    finally:
        sock.settimeout(TIMEOUT)
    return bytes(received)


def same(got, expected):
    """Compare big byte strings without pytest printing megabytes."""
    if got == expected:
        return True
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
              min(len(got), len(expected)))
    raise AssertionError(f"{len(got)} bytes instead of {len(expected)}, "
                         f"first difference at byte {at}")


def server_context(pki, name="good", ciphers=None):
    """A scripted server's TLS: *name*'s certificate; with *ciphers*, TLS
    1.2 with only those."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert(name), pki.key(name))
    if ciphers:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)
    return context


def imap_script(greeting=b"* OK scripted IMAP ready",
                caps=b"IMAP4rev1 STARTTLS", tls_caps=b"IMAP4rev1",
                starttls=b"OK Begin TLS negotiation", inject=b"",
                login=b"OK Logged in", context=None, implicit=False,
                not_tls=False, after_login=None):
    """An IMAP server: *caps* before TLS, *tls_caps* inside; *inject* is
    sent with the STARTTLS answer; *not_tls* answers OK and then speaks
    plaintext; *after_login* takes over after a successful LOGIN."""
    def script(peer):
        if implicit:
            peer.start_tls(context)
        peer.send(greeting + b"\r\n")
        while True:
            line = peer.readline()
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            command = rest.partition(b" ")[0].upper()
            if command == b"CAPABILITY":
                peer.send(b"* CAPABILITY %s\r\n%s OK CAPABILITY completed\r\n"
                          % (tls_caps if peer.tls else caps, tag))
            elif command == b"STARTTLS":
                peer.send(tag + b" " + starttls + b"\r\n" + inject)
                if not_tls:
                    peer.send(b"* OK this is not TLS\r\n" * 8)
                elif starttls.startswith(b"OK"):
                    peer.start_tls(context)
            elif command == b"LOGIN":
                peer.send(tag + b" " + login + b"\r\n")
                if after_login and login.startswith(b"OK"):
                    return after_login(peer)
            elif command == b"LOGOUT":
                peer.send(b"* BYE\r\n" + tag + b" OK LOGOUT completed\r\n")
                return
            else:
                peer.send(tag + b" OK " + command + b" completed\r\n")
    return script


def pop3_script(greeting=b"+OK scripted POP3 ready", caps=(b"USER", b"STLS"),
                tls_caps=(b"USER",), stls=b"+OK Begin TLS negotiation",
                inject=b"", password=b"+OK Logged in", context=None,
                not_tls=False):
    """A POP3 server, with the options of imap_script."""
    def script(peer):
        peer.send(greeting + b"\r\n")
        while True:
            line = peer.readline()
            command = line.strip().partition(b" ")[0].upper()
            if command == b"CAPA":
                peer.send(b"+OK Capability list follows\r\n" + b"".join(
                    cap + b"\r\n" for cap in (tls_caps if peer.tls
                                              else caps)) + b".\r\n")
            elif command == b"STLS":
                peer.send(stls + b"\r\n" + inject)
                if not_tls:
                    peer.send(b"+OK this is not TLS\r\n" * 8)
                elif stls.startswith(b"+OK"):
                    peer.start_tls(context)
            elif command == b"PASS":
                peer.send(password + b"\r\n")
            elif command == b"STAT":
                peer.send(b"+OK 0 0\r\n")
            elif command == b"QUIT":
                peer.send(b"+OK Bye\r\n")
                return
            else:
                peer.send(b"+OK\r\n")
    return script


def script_for(protocol, **options):
    return (imap_script if protocol == "IMAP4" else pop3_script)(**options)


# ---------------------------------------------------------------------------
# Configuration: the modes and the defaults of POP3S and IMAP4S
# ---------------------------------------------------------------------------

def config(*args, argv0="perdition"):
    return perdition.Config([argv0, "-f", "", *args])


@pytest.mark.parametrize("mode, flags", [
    ("none", set()),
    ("ssl_listen", {"ssl_listen"}),
    ("ssl_outgoing", {"ssl_outgoing"}),
    ("ssl_all", {"ssl_listen", "ssl_outgoing"}),
    ("tls_listen", {"tls_listen"}),
    ("tls_outgoing", {"tls_outgoing"}),
    ("tls_all", {"tls_listen", "tls_outgoing"}),
    ("tls_listen_force", {"tls_listen", "tls_listen_force"}),
    ("tls_outgoing_force", {"tls_outgoing", "tls_outgoing_force"}),
    ("tls_all_force", {"tls_listen", "tls_listen_force", "tls_outgoing",
                       "tls_outgoing_force"}),
    ("ssl_listen,tls_outgoing_force",
     {"ssl_listen", "tls_outgoing", "tls_outgoing_force"}),
    ("tls_listen,ssl_outgoing", {"tls_listen", "ssl_outgoing"}),
])
def test_ssl_mode_values(mode, flags):
    """Each value sets what the manual says, the short-hands and *_force
    included, and a comma list sets the union."""
    assert config("-P", "IMAP4", "--ssl_mode", mode).ssl_mode == flags


def test_unknown_ssl_mode_is_refused():
    with pytest.raises(perdition.OptionError, match="ssl_mode"):
        config("--ssl_mode", "ssl_sometimes")


@pytest.mark.parametrize("args, argv0, flags, listen, outgoing", [
    (["-P", "POP3"], "perdition", set(), 110, 110),
    (["-P", "IMAP4"], "perdition", set(), 143, 143),
    (["-P", "POP3S"], "perdition", {"ssl_listen", "ssl_outgoing"}, 995, 995),
    (["-P", "IMAP4S"], "perdition", {"ssl_listen", "ssl_outgoing"}, 993, 993),
    ([], "perdition.imaps", {"ssl_listen", "ssl_outgoing"}, 993, 993),
    ([], "perdition.pop3s", {"ssl_listen", "ssl_outgoing"}, 995, 995),
    # The manual's POP3S_FLAGS and IMAP4S_FLAGS: plaintext to the server.
    (["-P", "POP3S", "--ssl_mode", "ssl_listen", "-p", "110"], "perdition",
     {"ssl_listen"}, 995, 110),
    (["-P", "IMAP4S", "--ssl_mode", "ssl_listen", "-p", "143"], "perdition",
     {"ssl_listen"}, 993, 143),
])
def test_protocol_defaults(args, argv0, flags, listen, outgoing):
    """POP3S and IMAP4S mean SSL on both sides, and the real server's
    port follows: 995 and 993 (the ports are what Config derives; the
    tests cannot listen on them)."""
    result = config(*args, argv0=argv0)
    assert (result.ssl_mode, result.listen_port, result.outgoing_port) == \
        (flags, listen, outgoing)


# ---------------------------------------------------------------------------
# Every mode end to end, with imaplib and poplib
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_imap_in_every_mode(mode, mode_proxies, pki, dovecot):
    """The client side is what the mode says (imaplib verifies perdition's
    certificate), and so is the Dovecot side: its log says TLS exactly
    when the mode encrypts the connection to it."""
    client_side, server_side = MODES[mode]
    user, password = fresh_user()
    imap = imap_client(mode_proxies["IMAP4", mode].port, client_side,
                       client_context(pki))
    try:
        assert isinstance(imap.sock, ssl.SSLSocket) == (client_side != "plain")
        imap.login(user, password)
        assert imap.select("INBOX")[0] == "OK"      # Dovecot answers
    finally:
        imap.logout()
    line = dovecot_login(dovecot, user)
    assert (", TLS," in line) == (server_side != "plain"), line


@pytest.mark.parametrize("mode", MODES)
def test_pop3_in_every_mode(mode, mode_proxies, pki, dovecot):
    client_side, server_side = MODES[mode]
    user, password = fresh_user()
    pop = pop3_client(mode_proxies["POP3", mode].port, client_side,
                      client_context(pki))
    try:
        assert isinstance(pop.sock, ssl.SSLSocket) == (client_side != "plain")
        pop.user(user)
        assert pop.pass_(password).startswith(b"+OK You are so in")
        assert pop.stat() == (0, 0)                 # Dovecot answers
    finally:
        pop.quit()
    line = dovecot_login(dovecot, user)
    assert (", TLS," in line) == (server_side != "plain"), line


# ---------------------------------------------------------------------------
# Real clients: curl and openssl s_client
# ---------------------------------------------------------------------------

def curl(*args):
    return subprocess.run(["curl", "-sS", "--max-time", "20",
                           *map(str, args)], capture_output=True, text=True,
                          timeout=30)


MESSAGE = b"From: bob@localhost\r\nSubject: tls\r\n\r\nHello.\r\n"


def test_curl_imaps_and_pop3s(proxies, pki, dovecot):
    """IMAP4S and POP3S without --ssl_mode: TLS to the client (curl
    verifies perdition's certificate) and to Dovecot's TLS port."""
    imaps, pop3s = proxies.start(implicit_spec(pki, dovecot, "IMAP4S"),
                                 implicit_spec(pki, dovecot, "POP3S"))
    user, password = fresh_user()
    result = curl("--cacert", pki.cert("root"), "-u", f"{user}:{password}",
                  f"imaps://127.0.0.1:{imaps.port}/")
    assert result.returncode == 0, result.stderr
    assert "INBOX" in result.stdout
    assert ", TLS," in dovecot_login(dovecot, user)
    user, password = fresh_user()
    dovecot.add_message(user, MESSAGE)
    result = curl("--cacert", pki.cert("root"), "-u", f"{user}:{password}",
                  f"pop3s://127.0.0.1:{pop3s.port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("1 "), result.stdout
    assert ", TLS," in dovecot_login(dovecot, user)


@pytest.mark.parametrize("protocol, scheme, port", [
    ("IMAP4S", "imaps", "imap_port"), ("POP3S", "pop3s", "pop3_port")])
def test_manual_example_keeps_the_real_server_plaintext(
        protocol, scheme, port, proxies, pki, dovecot):
    """The manual's `POP3S_FLAGS="--ssl_mode ssl_listen -p 110"`: SSL to
    the client, plaintext to the real server's port given by -p."""
    proxy = proxies.get(protocol, "--ssl_mode", "ssl_listen", "-p",
                        getattr(dovecot, port), "-s", "127.0.0.1", "-M", "",
                        *listen_args(pki))
    user, password = fresh_user()
    result = curl("--cacert", pki.cert("root"), "-u", f"{user}:{password}",
                  f"{scheme}://127.0.0.1:{proxy.port}/")
    assert result.returncode == 0, result.stderr
    assert ", secured," in dovecot_login(dovecot, user)


@pytest.mark.parametrize("protocol, scheme", [("IMAP4", "imap"),
                                              ("POP3", "pop3")])
def test_curl_ssl_reqd_uses_starttls(protocol, scheme, mode_proxies, pki,
                                     dovecot):
    """curl --ssl-reqd logs in after STARTTLS/STLS, and gives up on a
    perdition that offers no TLS.  (curl 7.88 keeps a LOGINDISABLED seen
    before STARTTLS, so it cannot log in through tls_listen_force.)"""
    for mode in ("tls_listen", "tls_all"):
        user, password = fresh_user()
        result = curl("--ssl-reqd", "--cacert", pki.cert("root"), "-u",
                      f"{user}:{password}", f"{scheme}://127.0.0.1:"
                      f"{mode_proxies[protocol, mode].port}/")
        assert result.returncode == 0, (mode, result.stderr)
        line = dovecot_login(dovecot, user)
        assert (", TLS," in line) == (mode == "tls_all"), line
    user, password = fresh_user()
    plain = mode_proxies[protocol, "none"]
    result = curl("--ssl-reqd", "--cacert", pki.cert("root"), "-u",
                  f"{user}:{password}", f"{scheme}://127.0.0.1:{plain.port}/")
    assert result.returncode == 64, result.stderr   # "SSL level failed"
    assert not auth_lines(plain, user)


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_openssl_s_client_starttls(protocol, mode_proxies, pki, dovecot):
    """`openssl s_client -starttls imap|pop3` verifies perdition's
    certificate, and the session goes through to Dovecot over STARTTLS;
    commands pipelined behind the login reach Dovecot too."""
    user, password = fresh_user()
    if protocol == "IMAP4":
        script = f"a LOGIN {user} {password}\nb SELECT INBOX\nc LOGOUT\n"
        expected = ["a OK You are so in", "b OK [READ-WRITE]", "* BYE",
                    "c OK"]
    else:
        script = f"USER {user}\nPASS {password}\nSTAT\nQUIT\n"
        expected = ["+OK USER", "+OK You are so in", "+OK 0 0", "+OK"]
    result = subprocess.run(
        ["openssl", "s_client", "-connect",
         f"127.0.0.1:{mode_proxies[protocol, 'tls_all'].port}",
         "-starttls", protocol.lower().rstrip("4"), "-CAfile",
         pki.cert("root"), "-verify_return_error", "-verify_ip", "127.0.0.1",
         "-quiet", "-crlf"],
        input=script, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = iter(result.stdout.splitlines())
    assert all(any(line.startswith(e) for line in lines) for e in expected), \
        result.stdout       # each expected line, in order
    assert ", TLS," in dovecot_login(dovecot, user)


# ---------------------------------------------------------------------------
# The listening side: capabilities, forced TLS, login_disabled
# ---------------------------------------------------------------------------

# What perdition adds: ID always; the SASL words exactly when a plaintext
# login is allowed, where LOGINDISABLED does not stand.
IMAP = ["IMAP4", "IMAP4REV1", "ID"]
POP = ["UIDL", "USER"]
IMAP_SASL = IMAP + ["AUTH=PLAIN", "SASL-IR"]
POP_SASL = POP + ["SASL PLAIN"]


@pytest.mark.parametrize("protocol, mode, extra, before, after", [
    ("IMAP4", "none", [], IMAP_SASL, None),
    ("IMAP4", "none", ["-I", "IMAP4 IMAP4REV1 STARTTLS LOGINDISABLED"],
     IMAP_SASL, None),
    ("IMAP4", "ssl_listen", [], IMAP_SASL, None),
    ("IMAP4", "tls_listen", [], IMAP_SASL + ["STARTTLS"], IMAP_SASL),
    ("IMAP4", "tls_listen", ["-I", "IMAP4 IMAP4REV1 STARTTLS LITERAL+"],
     IMAP_SASL + ["LITERAL+", "STARTTLS"], IMAP_SASL + ["LITERAL+"]),
    ("IMAP4", "tls_listen", ["-I", "IMAP4 IMAP4REV1 AUTH=PLAIN SASL-IR"],
     IMAP_SASL + ["STARTTLS"], IMAP_SASL),
    ("IMAP4", "tls_listen_force", [], IMAP + ["STARTTLS", "LOGINDISABLED"],
     IMAP_SASL),
    ("IMAP4", "tls_listen_force", ["-I", "IMAP4 IMAP4REV1 AUTH=PLAIN"],
     IMAP + ["STARTTLS", "LOGINDISABLED"], IMAP_SASL),
    ("IMAP4", "tls_all_force", [], IMAP + ["STARTTLS", "LOGINDISABLED"],
     IMAP_SASL),
    # Forced TLS towards the server does not stop the client logging in.
    ("IMAP4", "tls_outgoing_force", [], IMAP_SASL, None),
    ("IMAP4", "none", ["--login_disabled"], IMAP + ["LOGINDISABLED"], None),
    ("IMAP4", "tls_listen", ["--login_disabled"],
     IMAP + ["STARTTLS", "LOGINDISABLED"], IMAP + ["LOGINDISABLED"]),
    ("POP3", "none", [], POP_SASL, None),
    ("POP3", "none", ["-I", "UIDL  USER  STLS"], POP_SASL, None),
    ("POP3", "ssl_listen", [], POP_SASL, None),
    ("POP3", "tls_listen", [], POP_SASL + ["STLS"], POP_SASL),
    ("POP3", "tls_listen", ["-I", "UIDL  STLS  USER"], POP_SASL + ["STLS"],
     POP_SASL),
    ("POP3", "tls_listen_force", [], POP + ["STLS"], POP_SASL),
    ("POP3", "tls_listen_force", ["-I", "UIDL  USER  SASL PLAIN"],
     POP + ["STLS"], POP_SASL),
    ("POP3", "tls_listen", ["--login_disabled"], POP + ["STLS"], POP),
    ("POP3", "tls_outgoing_force", [], POP_SASL, None),
])
def test_capabilities(protocol, mode, extra, before, after, proxies, pki,
                      dovecot):
    """STLS/STARTTLS is listed (once) exactly while perdition listens for
    TLS and the connection is not encrypted yet; LOGINDISABLED while
    tls_listen_force waits for STARTTLS, and always with --login_disabled.
    STARTTLS is refused where it is not listed."""
    proxy = proxies.get(*mode_spec(pki, dovecot, protocol, mode, *extra))
    context = client_context(pki)
    with RawClient(proxy.port) as client:
        if MODES[mode][0] == "ssl":
            client.starttls(context)
        client.readline()
        assert capabilities(protocol, client) == sorted(before)
        if after is None:
            assert not start_tls(protocol, client)
            return
        assert start_tls(protocol, client)
        client.starttls(context)
        assert capabilities(protocol, client) == sorted(after)
        assert not start_tls(protocol, client)


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_tls_listen_force_refuses_plaintext_login(protocol, mode_proxies,
                                                  pki, dovecot):
    """With tls_listen_force no login goes anywhere before STARTTLS/STLS
    (neither USER nor PASS in POP3), and the same login works after it;
    tls_listen alone takes a plaintext login."""
    proxy = mode_proxies[protocol, "tls_listen_force"]
    user, password = fresh_user()
    with RawClient(proxy.port) as client:
        client.readline()
        if protocol == "IMAP4":
            answer = exchange(client, "a", f"LOGIN {user} {password}")[-1]
            assert answer.startswith(("a NO", "a BAD")), answer
        else:
            assert pop3_command(client, f"USER {user}")[0].startswith("-ERR")
            assert pop3_command(client, f"PASS {password}")[0] \
                .startswith("-ERR")
        assert not auth_lines(proxy, user)
        assert start_tls(protocol, client)
        client.starttls(client_context(pki))
        if protocol == "IMAP4":
            answer = exchange(client, "b", f"LOGIN {user} {password}")[-1]
            assert answer == "b OK You are so in"
        else:
            assert pop3_command(client, f"USER {user}")[0].startswith("+OK")
            assert pop3_command(client, f"PASS {password}")[0] == \
                "+OK You are so in"
    dovecot_login(dovecot, user)
    user, password = fresh_user()
    assert login_succeeds(protocol, mode_proxies[protocol, "tls_listen"].port,
                          user, password)


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_over_long_line_inside_tls(protocol, mode_proxies, pki):
    """A line over the limit after STARTTLS/STLS: the client reads the
    error and the end of TLS, and what it sends meanwhile is dropped, not
    answered with a reset."""
    proxy = mode_proxies[protocol, "tls_listen"]
    errors = proxy.log().count("Line too long")
    with RawClient(proxy.port) as client:
        client.readline()
        assert start_tls(protocol, client)
        client.starttls(client_context(pki))
        command = b"a1 LOGIN " if protocol == "IMAP4" else b"USER "
        client.send(command + b"x" * 100000 + b"\r\n")
        proxy.wait_for_log("Line too long", count=errors + 1)
        client.send(b"NOOP\r\n" * 10000)
        answer = wait_for_eof(client)
    assert answer.startswith(b"* BYE " if protocol == "IMAP4" else b"-ERR ")


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_login_disabled_before_and_after_starttls(protocol, proxies, pki,
                                                  dovecot):
    proxy = proxies.get(*mode_spec(pki, dovecot, protocol, "tls_listen",
                                   "--login_disabled"))
    user, password = fresh_user()
    with RawClient(proxy.port) as client:
        client.readline()
        for secure in (False, True):
            if protocol == "IMAP4":
                answer = exchange(client, "a", f"LOGIN {user} {password}")
                assert answer[-1].startswith(("a NO", "a BAD")), answer
            else:
                assert pop3_command(client, f"USER {user}")[0] \
                    .startswith("-ERR")
            if not secure:
                assert start_tls(protocol, client)
                client.starttls(client_context(pki))
    assert not auth_lines(proxy, user)


def test_listen_chain_file_sends_the_chain(proxies, pki, dovecot):
    """perdition's certificate is issued by an intermediate CA the client
    does not know: --ssl_ca_chain_file sends it along, without it the
    client cannot verify."""
    with_chain, without = proxies.start(
        mode_spec(pki, dovecot, "IMAP4", "ssl_listen", "--ssl_ca_chain_file",
                  pki.cert("listen_ca"), cert="listen_chained"),
        mode_spec(pki, dovecot, "IMAP4", "ssl_listen", cert="listen_chained"))
    user, password = fresh_user()
    imap = imap_client(with_chain.port, "ssl", client_context(pki))
    try:
        imap.login(user, password)
    finally:
        imap.logout()
    with pytest.raises(ssl.SSLCertVerificationError,
                       match="unable to get local issuer"):
        imap_client(without.port, "ssl", client_context(pki))


AES128 = "ECDHE-ECDSA-AES128-GCM-SHA256"
AES256 = "ECDHE-ECDSA-AES256-GCM-SHA384"


def tls12_context(pki, cipher):
    context = client_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    return context


def test_listen_ciphers(proxies, pki, dovecot):
    """A TLS 1.2 client gets only the ciphers of --ssl_listen_ciphers;
    without the option OpenSSL's default list applies."""
    restricted, default = proxies.start(
        mode_spec(pki, dovecot, "IMAP4", "ssl_listen", "--ssl_listen_ciphers",
                  AES256),
        mode_spec(pki, dovecot, "IMAP4", "ssl_listen"))
    with RawClient(restricted.port) as client, \
            pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        client.starttls(tls12_context(pki, AES128))  # told by an alert
    for proxy, cipher in ((restricted, AES256), (default, AES128)):
        with RawClient(proxy.port) as client:
            client.starttls(tls12_context(pki, cipher))
            assert client.sock.cipher()[0] == cipher
            assert client.readline().startswith(b"* OK IMAP4 Ready")


def tls11_context():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_listen_refuses_tls_older_than_1_2(mode_proxies):
    """A TLS 1.1 client is turned away: perdition logs why."""
    proxy = mode_proxies["IMAP4", "ssl_listen"]
    with RawClient(proxy.port) as client, pytest.raises(ssl.SSLError):
        client.starttls(tls11_context())
    proxy.wait_for_log("UNSUPPORTED_PROTOCOL")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_listen_ciphers_at_security_level_0_admit_old_tls(proxies, pki,
                                                          dovecot):
    """A cipher list that says @SECLEVEL=0 lowers the TLS 1.2 minimum."""
    proxy, = proxies.start(mode_spec(
        pki, dovecot, "IMAP4", "ssl_listen", "--ssl_listen_ciphers",
        "DEFAULT:@SECLEVEL=0"))
    with RawClient(proxy.port) as client:
        client.starttls(tls11_context())
        assert client.sock.version() == "TLSv1.1"
        assert client.readline().startswith(b"* OK IMAP4 Ready")


# ---------------------------------------------------------------------------
# The outgoing side: certificate verification
# ---------------------------------------------------------------------------

CHECKED = {"good", "long_chain"}    # what the CA file alone accepts
# Options on top of the outgoing defaults: the servers they accept.
VERIFY_ROWS = {
    "no CA": ([], set()),
    "Dovecot's certificate as CA": (["--ssl_ca_file", "{dovecot}"],
                                    {"dovecot"}),
    "CA": (["--ssl_ca_file", "{root}"], CHECKED),
    "no_cert_verify": (["--ssl_no_cert_verify"], set(BACKENDS)),
    "no_cn_verify": (["--ssl_ca_file", "{root}", "--ssl_no_cn_verify"],
                     CHECKED | {"wrong_name"}),
    "ca_accept_self_signed": (["--ssl_ca_file", "{root}",
                               "--ssl_ca_accept_self_signed"],
                              CHECKED | {"unknown_ca"}),
    "cert_accept_self_signed": (["--ssl_ca_file", "{root}",
                                 "--ssl_cert_accept_self_signed"],
                                CHECKED | {"self_signed", "dovecot"}),
    "cert_accept_expired": (["--ssl_ca_file", "{root}",
                             "--ssl_cert_accept_expired"],
                            CHECKED | {"expired", "expired_ca"}),
    "cert_accept_not_yet_valid": (["--ssl_ca_file", "{root}",
                                   "--ssl_cert_accept_not_yet_valid"],
                                  CHECKED | {"not_yet_valid",
                                             "not_yet_valid_ca"}),
    # The long chain's root is at depth 3.
    "cert_verify_depth 2": (["--ssl_ca_file", "{root}",
                             "--ssl_cert_verify_depth", "2"], {"good"}),
    "cert_verify_depth 3": (["--ssl_ca_file", "{root}",
                             "--ssl_cert_verify_depth", "3"], CHECKED),
    "ca_path": (["--ssl_ca_path", "{capath}"], CHECKED),
    # The chain file overrides --ssl_ca_file, which would accept
    # unknown_ca_leaf.
    "ca_chain_file": (["--ssl_ca_chain_file", "{root}", "--ssl_ca_file",
                       "{other}"], CHECKED),
}
FAILURE_REASONS = {
    "dovecot": "self-signed certificate",
    "wrong_name": "IP address mismatch",
    "expired": "certificate has expired",
    "not_yet_valid": "certificate is not yet valid",
    "self_signed": "self-signed certificate",
    "unknown_ca": "self-signed certificate in certificate chain",
    "unknown_ca_leaf": "unable to get local issuer certificate",
    "expired_ca": "certificate has expired",
    "not_yet_valid_ca": "certificate is not yet valid",
}


@pytest.fixture(scope="module")
def verify_proxies(proxies, pki, dovecot):
    """A perdition per VERIFY_ROWS row, started together; clients choose
    the server (user@address), SSL to Dovecot's TLS port."""
    paths = {"root": pki.cert("root"), "other": pki.cert("other"),
             "dovecot": dovecot.cert_file, "capath": pki.capath}
    specs = [("IMAP4", "-c", "-M", "", "--ssl_mode", "ssl_outgoing", "-p",
              dovecot.imaps_port, *(arg.format(**paths) for arg in args))
             for args, _ in VERIFY_ROWS.values()]
    return dict(zip(VERIFY_ROWS, proxies.start(*specs)))


@pytest.mark.parametrize("row", VERIFY_ROWS)
def test_outgoing_verification(row, verify_proxies, dovecot):
    """Each option turns exactly its own case from a failed login into a
    good one, and no other (--ssl_cert_verify_depth works the other way:
    it turns the long chain away)."""
    proxy = verify_proxies[row]
    accepted = {name for name, address in BACKENDS.items()
                if login_succeeds("IMAP4", proxy.port, f"alice@{address}",
                                  "alicepw")}
    assert accepted == VERIFY_ROWS[row][1]


def test_outgoing_verification_failures_are_logged(verify_proxies, dovecot):
    """A failed verification is a failed login with the reason logged."""
    proxy = verify_proxies["CA"]
    for name, reason in FAILURE_REASONS.items():
        user = f"bob@{BACKENDS[name]}"
        assert not login_succeeds("IMAP4", proxy.port, user, "bobpw")
        [line] = auth_lines(proxy, user)
        assert "status=failed: TLS: " + reason in line, line


@pytest.mark.parametrize("option, accepted", [
    ("--ssl_cert_accept_self_signed", "self_signed"),
    ("--ssl_ca_accept_self_signed", "unknown_ca")])
def test_accepted_self_signed_with_a_ca_file_only_root_reads(
        option, accepted, proxies, pki, dovecot, tmp_path_factory):
    """perdition reads --ssl_ca_file as root at start-up; trusting a
    self-signed certificate later, as the user it dropped to, must not
    depend on reading it again (and a CA file may well be root's alone)."""
    private = tmp_path_factory.mktemp("private")
    share(str(private))
    ca_file = private / "ca.pem"
    shutil.copy(pki.cert("root"), ca_file)
    os.chmod(ca_file, 0o600)
    proxy = proxies.get("IMAP4", "-c", "-M", "", "--ssl_mode", "ssl_outgoing",
                        "-p", dovecot.imaps_port, "--ssl_ca_file", ca_file,
                        option)
    for name in ("good", accepted):
        assert login_succeeds("IMAP4", proxy.port,
                              f"alice@{BACKENDS[name]}", "alicepw"), name
    assert "Session from" not in proxy.log()


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_starttls_to_the_server_is_verified(protocol, proxies, pki, dovecot):
    """STARTTLS/STLS towards Dovecot's plain port checks the certificate
    as implicit TLS does."""
    port = dovecot.imap_port if protocol == "IMAP4" else dovecot.pop3_port
    proxy = proxies.get(*chooser_spec(pki, protocol, "tls_outgoing_force",
                                      "-p", port))
    accepted = {name for name in ("good", "wrong_name", "expired")
                if login_succeeds(protocol, proxy.port,
                                  f"alice@{BACKENDS[name]}", "alicepw")}
    assert accepted == {"good"}


def test_outgoing_ciphers(proxies, pki):
    """Against a real server that speaks TLS 1.2 with one cipher only,
    --ssl_outgoing_ciphers with another fails, with that one (or
    OpenSSL's default list) works."""
    rows = {AES256: True, AES128: False, "": True}
    specs = [chooser_spec(pki, "IMAP4", "ssl_outgoing",
                          *(["--ssl_outgoing_ciphers", c] if c else []))
             for c in rows]
    results = {}
    with ScriptedBackend(imap_script(
            implicit=True, context=server_context(pki, ciphers=AES256))) \
            as backend:
        for cipher, proxy in zip(rows, proxies.start(*specs)):
            results[cipher] = login_succeeds(
                "IMAP4", proxy.port, f"alice@127.0.0.1:{backend.port}", "pw")
    assert results == rows
    assert {peer.cipher for peer in backend.peers} == {AES256, None}


# ---------------------------------------------------------------------------
# The outgoing side: STARTTLS, and what must never happen
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_server_without_starttls(protocol, proxies, pki):
    """A real server that offers no STARTTLS/STLS is used in plaintext by
    tls_outgoing, and gets no credentials from tls_outgoing_force."""
    script = script_for(protocol, caps=b"IMAP4rev1" if protocol == "IMAP4"
                        else (b"USER",))
    lenient, strict = proxies.start(
        chooser_spec(pki, protocol, "tls_outgoing"),
        chooser_spec(pki, protocol, "tls_outgoing_force"))
    for proxy, works in ((lenient, True), (strict, False)):
        with ScriptedBackend(script) as backend:
            assert login_succeeds(protocol, proxy.port,
                                  f"u@127.0.0.1:{backend.port}",
                                  "secret-pw") == works
        assert (b"secret-pw" in backend.received()) == works


NO_TLS_CASES = {
    # case: (mode, script options for IMAP, for POP3)
    "no STARTTLS, forced": ("tls_outgoing_force", dict(caps=b"IMAP4rev1"),
                            dict(caps=(b"USER",))),
    "STARTTLS refused": ("tls_outgoing_force", dict(starttls=b"NO not now"),
                         dict(stls=b"-ERR not now")),
    "plaintext after STARTTLS OK": ("tls_outgoing_force", dict(not_tls=True),
                                    dict(not_tls=True)),
    "untrusted certificate": ("tls_outgoing_force", dict(cert="self_signed"),
                              dict(cert="self_signed")),
    "SSL to a plaintext server": ("ssl_outgoing", {}, {}),
}


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
@pytest.mark.parametrize("case", NO_TLS_CASES)
def test_no_credentials_without_tls(case, protocol, proxies, pki):
    """When the mode demands TLS and TLS does not come up, the login fails
    and the real server never sees the password, nor a LOGIN, USER or PASS
    command."""
    mode, imap_options, pop3_options = NO_TLS_CASES[case]
    options = dict(imap_options if protocol == "IMAP4" else pop3_options)
    options["context"] = server_context(pki, options.pop("cert", "good"))
    proxy = proxies.get(*chooser_spec(pki, protocol, mode))
    with ScriptedBackend(script_for(protocol, **options)) as backend:
        assert not login_succeeds(protocol, proxy.port,
                                  f"u@127.0.0.1:{backend.port}", "secret-pw")
    received = backend.received()
    assert backend.peers and b"secret-pw" not in received
    for command in (b"LOGIN", b"USER", b"PASS"):
        assert command not in received.upper()


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_client_plaintext_after_starttls_is_discarded(protocol, mode_proxies,
                                                      pki, dovecot):
    """A login sent in the same packet right after STARTTLS/STLS (a
    man in the middle's injection) is dropped, never run after the
    handshake."""
    proxy = mode_proxies[protocol, "tls_listen"]
    user, password = fresh_user()
    with RawClient(proxy.port) as client:
        client.readline()
        if protocol == "IMAP4":
            client.send(f"a STARTTLS\r\nb LOGIN {user} {password}\r\n"
                        .encode())
            assert client.readline().startswith(b"a OK")
            client.starttls(client_context(pki))
            assert exchange(client, "c", "NOOP") == ["c OK NOOP completed"]
        else:
            client.send(f"STLS\r\nUSER {user}\r\nPASS {password}\r\n"
                        .encode())
            assert client.readline().startswith(b"+OK")
            client.starttls(client_context(pki))
            assert pop3_command(client, "NOOP")[0] == "+OK"
            assert pop3_command(client, "PASS x")[0] == \
                "-ERR USER must come before PASS"
    assert not auth_lines(proxy, user)


INJECTIONS = {
    "IMAP4": (b"".join(b"P%d OK injected\r\n" % n for n in range(10))
              + b"* CAPABILITY IMAP4rev1 injected\r\n",
              dict(login=b"NO [AUTHENTICATIONFAILED] Authentication failed")),
    "POP3": (b"+OK injected\r\n" * 5, dict(password=b"-ERR denied")),
}


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_server_injection_after_starttls_is_discarded(protocol, proxies, pki):
    """Responses a real server (or a man in the middle) sends after its
    STARTTLS/STLS OK and before the handshake would answer perdition's
    next commands: they are dropped, so the real answer inside TLS -- a
    refused login -- is what counts."""
    inject, options = INJECTIONS[protocol]
    proxy = proxies.get(*chooser_spec(pki, protocol, "tls_outgoing"))
    with ScriptedBackend(script_for(protocol, inject=inject,
                                    context=server_context(pki),
                                    **options)) as backend:
        assert not login_succeeds(protocol, proxy.port,
                                  f"u@127.0.0.1:{backend.port}", "pw")
    [peer] = backend.peers
    assert b"PASS" in peer.secure or b"LOGIN" in peer.secure


def transcript(protocol, port, user, password):
    """Everything perdition sends a plaintext client that logs in, does
    one command and leaves."""
    with RawClient(port) as client:
        data = client.readline()
        if protocol == "IMAP4":
            commands = [f"a LOGIN {user} {password}", "b NOOP", "c LOGOUT"]
        else:
            commands = [f"USER {user}", f"PASS {password}", "STAT", "QUIT"]
        for command in commands:
            client.send(command.encode() + b"\r\n")
            data += client.readline()
        return data + wait_for_eof(client, 5)


@pytest.mark.parametrize("protocol", ["IMAP4", "POP3"])
def test_nothing_said_before_tls_is_relayed(protocol, proxies, pki):
    """The real server's greeting and capabilities before STARTTLS never
    reach the client, and perdition asks for capabilities again inside
    TLS: the LOGINDISABLED the server showed before does not count."""
    if protocol == "IMAP4":
        script = imap_script(
            greeting=b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] "
                     b"MARKER greeting",
            caps=b"IMAP4rev1 STARTTLS LOGINDISABLED MARKER",
            context=server_context(pki))
    else:
        script = pop3_script(greeting=b"+OK MARKER greeting",
                             caps=(b"USER", b"STLS", b"MARKER"),
                             context=server_context(pki))
    proxy = proxies.get(*chooser_spec(pki, protocol, "tls_outgoing"))
    with ScriptedBackend(script) as backend:
        data = transcript(protocol, proxy.port, f"u@127.0.0.1:{backend.port}",
                          "pw")
    assert b"You are so in" in data and b"MARKER" not in data, data
    [peer] = backend.peers
    if protocol == "IMAP4":
        assert b"CAPABILITY" in peer.secure and b"LOGIN" in peer.secure
    else:
        assert b"PASS" in peer.secure


def test_capabilities_inside_tls_count(proxies, pki):
    """LOGINDISABLED shown only inside TLS stops the login, although the
    greeting's capabilities said otherwise: no LOGIN is sent."""
    proxy = proxies.get(*chooser_spec(pki, "IMAP4", "tls_outgoing"))
    with ScriptedBackend(imap_script(
            greeting=b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready",
            tls_caps=b"IMAP4rev1 LOGINDISABLED",
            context=server_context(pki))) as backend:
        assert not login_succeeds("IMAP4", proxy.port,
                                  f"u@127.0.0.1:{backend.port}", "pw")
    [peer] = backend.peers
    assert b"CAPABILITY" in peer.secure
    assert b"LOGIN" not in backend.received()


@pytest.mark.parametrize("mode", ["tls_outgoing", "tls_outgoing_force"])
def test_preauth_greeting_is_a_failed_login(mode, proxies, pki):
    """A real server that greets with PREAUTH (a man in the middle who
    would skip TLS) is a failed login, and nothing of it is relayed."""
    proxy = proxies.get(*chooser_spec(pki, "IMAP4", mode))
    with ScriptedBackend(imap_script(
            greeting=b"* PREAUTH [CAPABILITY IMAP4rev1 STARTTLS] MARKER",
            context=server_context(pki))) as backend:
        data = transcript("IMAP4", proxy.port, f"u@127.0.0.1:{backend.port}",
                          "secret-pw")
    assert b"a NO " in data and b"MARKER" not in data, data
    assert b"secret-pw" not in backend.received()


HANDSHAKE_FAILURES = {
    "plaintext to the SSL port": ("ssl_listen", b"a LOGIN alice alicepw\r\n"),
    # Not even a TLS record header: no record type starts with 0xff.
    "garbage to the SSL port": ("ssl_listen",
                                b"\xff" + random.Random(4).randbytes(300)),
    "garbage after STARTTLS": ("tls_listen",
                               b"\xff" + random.Random(5).randbytes(300)),
    "client rejects the certificate": ("ssl_listen", None),
}


@pytest.mark.parametrize("case", HANDSHAKE_FAILURES)
def test_failed_handshake_ends_the_connection(case, mode_proxies, pki,
                                              dovecot):
    """A failed handshake closes that connection at once (not after the
    authentication timeout), and perdition goes on serving others."""
    mode, payload = HANDSHAKE_FAILURES[case]
    proxy = mode_proxies["IMAP4", mode]
    closes = proxy.log().count("Close: ")
    with RawClient(proxy.port) as client:
        if mode == "tls_listen":
            client.readline()
            assert start_tls("IMAP4", client)
        if payload is None:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.starttls(client_context(pki, "other"))
        else:
            client.send(payload)
            assert b"OK" not in wait_for_eof(client, 5, reset=True)
    deadline = time.monotonic() + 5
    while proxy.log().count("Close: ") == closes:
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.02)
    user, password = fresh_user()
    imap = imap_client(proxy.port, MODES[mode][0], client_context(pki))
    try:
        imap.login(user, password)
    finally:
        imap.logout()
    assert proxy.proc.poll() is None
    assert "Session from" not in proxy.log()     # no traceback


# ---------------------------------------------------------------------------
# Start-up with a bad certificate or key
# ---------------------------------------------------------------------------

def start_up(tmp_path, *args, protocol="IMAP4"):
    return run_perdition(["-P", protocol, "--no_daemon", "-F", "+", "-b",
                          "127.0.0.1", "-l", free_port(), "-M", "", *args],
                         tmpdir=tmp_path)


@pytest.mark.parametrize("case", ["missing certificate", "missing key",
                                  "certificate not PEM", "key not PEM",
                                  "key of another certificate",
                                  "certificate is a directory",
                                  "missing chain file", "missing CA file",
                                  "missing CA directory"])
def test_bad_certificate_or_key_stops_start_up(case, tmp_path, pki):
    """perdition refuses to start, at once, naming the file (also the
    CA files and directory of the outgoing side)."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a PEM file\n")
    missing = str(tmp_path / "missing.pem")
    cert, key = pki.cert("listen"), pki.key("listen")
    mode, culprit, extra = {
        "missing certificate": ("ssl_listen", missing, []),
        "missing key": ("tls_listen", missing, []),
        "certificate not PEM": ("ssl_listen", str(junk), []),
        "key not PEM": ("tls_listen", str(junk), []),
        "key of another certificate": ("ssl_listen", pki.key("good"), []),
        "certificate is a directory": ("ssl_listen", str(tmp_path), []),
        "missing chain file": ("ssl_listen", missing,
                               ["--ssl_ca_chain_file", missing]),
        "missing CA file": ("ssl_outgoing", missing,
                            ["--ssl_ca_file", missing]),
        "missing CA directory": ("ssl_outgoing", missing,
                                 ["--ssl_ca_path", missing]),
    }[case]
    if "certificate" in case:
        cert = culprit
    elif "key" in case:
        key = culprit
    result = start_up(tmp_path, "--ssl_mode", mode, "--ssl_cert_file", cert,
                      "--ssl_key_file", key, *extra)
    assert result.returncode != 0
    assert culprit in result.stderr, result.stderr


def test_pop3s_needs_its_default_certificate(tmp_path):
    """POP3S without certificate options looks for the default files, and
    says which one is missing."""
    result = start_up(tmp_path, protocol="POP3S")
    assert result.returncode != 0
    assert os.path.join(tmp_path, "etc", "perdition.crt.pem") \
        in result.stderr, result.stderr


def test_unreadable_key_stops_start_up(tmp_path, pki):
    """A key only root may read, for a perdition started as nobody."""
    key = tmp_path / "private.key"
    shutil.copy(pki.key("listen"), key)
    os.chmod(key, 0o600)
    code = readable_copy(str(tmp_path / "code"))
    share(str(tmp_path / "env"))        # reachable, but the key not readable
    share(os.path.dirname(code))
    os.chmod(tmp_path, 0o711)
    python = shutil.which("python3", path="/usr/bin:/bin")
    result = subprocess.run(
        [python, code, "-P", "IMAP4", "--no_daemon", "-F", "+", "-b",
         "127.0.0.1", "-l", str(free_port()), "-M", "", "--ssl_mode",
         "ssl_listen", "--ssl_cert_file", pki.cert("listen"),
         "--ssl_key_file", str(key)],
        user="nobody", group=pwd.getpwnam("nobody").pw_gid, extra_groups=[],
        env=perdition_env(str(tmp_path / "env")),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    assert result.returncode != 0
    assert str(key) in result.stderr and "ermission denied" in result.stderr, \
        result.stderr


# ---------------------------------------------------------------------------
# Threads and TLS: bulk data both ways at once
# ---------------------------------------------------------------------------

BULK = 16 * 1024 * 1024


def bulk_data(seed):
    return random.Random(seed).randbytes(BULK)


def bulk_after_login(peer):
    """After the login the scripted server sends BULK bytes while it
    reads BULK bytes, and keeps whether they were the client's."""
    seed = int(re.search(rb"LOGIN \S*?(\d+)", peer.secure).group(1))
    got = duplex(peer.sock, bulk_data(seed + 1000),
                 lambda data: len(data) >= BULK, peer.buffer)
    peer.result = same(got, bulk_data(seed))


def bulk_session(port, context, seed, backend_port):
    with RawClient(port) as client:
        client.starttls(context)
        client.readline()
        client.send(b'a LOGIN "bulk%d@127.0.0.1:%d" pw\r\n'
                    % (seed, backend_port))
        assert client.readline() == b"a OK You are so in\r\n"
        got = duplex(client.sock, bulk_data(seed),
                     lambda data: len(data) >= BULK, client.buffer)
    return same(got, bulk_data(seed + 1000))


def test_bulk_both_ways_at_once_through_ssl_all(proxies, pki):
    """Four sessions through IMAP4S (TLS on both sides), each pushing
    16 MiB each way at the same time, in small records: both pump threads
    of a session work on the same two TLS connections at once, and every
    byte arrives.  (Without perdition's serialisation of the calls on each
    SSL object -- say, an ssl.SSLSocket read by one thread while the other
    writes -- sessions break off here.)"""
    proxy = proxies.get(*chooser_spec(pki, "IMAP4S", "ssl_all"))
    context = client_context(pki)
    with ScriptedBackend(imap_script(implicit=True,
                                     context=server_context(pki),
                                     after_login=bulk_after_login)) \
            as backend, ThreadPoolExecutor(max_workers=4) as pool:
        sessions = [pool.submit(bulk_session, proxy.port, context, seed,
                                backend.port) for seed in (1, 2, 3, 4)]
        assert all(session.result(timeout=90) for session in sessions)
        backend.join(4)
    assert [peer.result for peer in backend.peers] == [True] * 4, \
        [peer.error for peer in backend.peers]
    for seed in (1, 2, 3, 4):
        line = proxy.wait_for_log(f'Close: 127.0.0.1 user="bulk{seed}@')
        sizes = re.search(f'user="bulk{seed}@[^"]*" received=(\\d+) '
                          f'sent=(\\d+)', line)
        assert int(sizes.group(1)) >= BULK and int(sizes.group(2)) >= BULK


def big_message(seed, size=3 * 1024 * 1024):
    """An RFC 5322 message of about *size* bytes, CRLF lines of hex."""
    body = random.Random(seed).randbytes(size // 2).hex()
    lines = [body[i:i + 76] for i in range(0, len(body), 76)]
    return (b"From: bob@localhost\r\nSubject: big %d\r\n\r\n" % seed
            + "\r\n".join(lines).encode() + b"\r\n")


def until_tagged(tag):
    return lambda data: data.endswith(b"\r\n") and \
        re.search(rb"(^|\r\n)%s (OK|NO|BAD)[^\r\n]*\r\n$" % tag,
                  bytes(data[-300:])) is not None


def fetched(data, number):
    match = re.search(rb"\* %d FETCH \(BODY\[\] \{(\d+)\}\r\n" % number, data)
    assert match, data[:300]
    return data[match.end():match.end() + int(match.group(1))]


def test_append_while_fetching_through_ssl_all(proxies, pki, dovecot):
    """Dovecot streams a 3 MB message back while a 3 MB APPEND goes up,
    through IMAP4S to Dovecot's TLS port; both arrive whole."""
    proxy = proxies.get(*implicit_spec(pki, dovecot, "IMAP4S"))
    user, password = fresh_user()
    first, second = big_message(1), big_message(2)
    dovecot.add_message(user, first)
    with RawClient(proxy.port) as client:
        client.starttls(client_context(pki))
        client.readline()
        assert exchange(client, "a", f"LOGIN {user} {password}")[-1] == \
            "a OK You are so in"
        assert exchange(client, "s", "SELECT INBOX")[-1].startswith("s OK")
        data = duplex(client.sock, b"f FETCH 1 BODY.PEEK[]\r\n"
                      b"p APPEND INBOX {%d+}\r\n%s\r\nz NOOP\r\n"
                      % (len(second), second), until_tagged(b"z"),
                      client.buffer)
        assert re.search(rb"\r\np OK", data)
        assert same(fetched(data, 1), first)
        data = duplex(client.sock, b"g FETCH 2 BODY.PEEK[]\r\n",
                      until_tagged(b"g"))
        assert same(fetched(data, 2), second)
