"""A private Dovecot 2.3 to serve as perdition's real back-end in tests.

Everything Dovecot needs -- configuration, users, maildirs, a self-signed
certificate, its run and state directories and its log -- lives in one
temporary directory, and it listens only on free loopback ports, so it runs
beside anything else on the machine and leaves nothing behind.

The master runs in the foreground (``dovecot -F``) as our own child process:
it is stopped by its PID, and its exit status is reaped here rather than left
to whatever init the machine has.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

__all__ = ["Dovecot", "dovecot_binary", "free_port", "default_users"]

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
# Owner of the maildirs and of the processes that read them.
MAIL_USER = "dovecot"
# Shipped with the dovecot-core package: saves generating DH parameters, which
# takes minutes, for clients that insist on a DHE cipher suite.
SYSTEM_DH = "/usr/share/dovecot/dh.pem"


def dovecot_binary():
    """Path of the dovecot program, or None; it lives in /usr/sbin, which
    an unprivileged user's PATH often lacks."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin"])
    return shutil.which("dovecot", path=path)


def managesieve_binary():
    """Path of Dovecot's ManageSieve login process (Debian's
    dovecot-managesieved), or None."""
    path = "/usr/lib/dovecot/managesieve-login"
    return path if os.access(path, os.X_OK) else None


_handed_out = set()


def free_port():
    """Return a loopback TCP port that nothing listens on right now and
    that this process has not handed out before (the kernel may offer the
    same free port twice in a row)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no fresh free port in 100 tries")


def default_users():
    """alice, bob and user1..user200, each with a known password."""
    users = {"alice": "alicepw", "bob": "bobpw"}
    users.update((f"user{n}", f"pw{n}") for n in range(1, 201))
    return users


CONFIG = """\
base_dir = {base_dir}
state_dir = {state_dir}
log_path = {log_path}
protocols = imap pop3 sieve
listen = 127.0.0.1
shutdown_clients = yes

ssl = yes
ssl_cert = <{cert_file}
ssl_key = <{key_file}
ssl_min_protocol = TLSv1.2
{ssl_dh}

disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
auth_username_format = %u
auth_verbose = yes
login_trusted_networks = 127.0.0.0/8

mail_location = maildir:~
mail_uid = {mail_uid}
mail_gid = {mail_gid}
first_valid_uid = 0
mail_max_userip_connections = 2000

default_client_limit = 4000
default_process_limit = 1000

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd_file}
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
  service_count = 0
  client_limit = 1000
  process_limit = 4
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s_port}
    ssl = yes
  }}
  service_count = 0
  client_limit = 1000
  process_limit = 4
}}
# Failed logins from 127.0.0.1 would otherwise wait up to 15 s each (the
# auth penalty ignores login_trusted_networks for direct clients); a failure
# still takes about 0.5 s, the auth process's delay-queue tick.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service managesieve-login {{
  inet_listener sieve {{
    address = 127.0.0.1
    port = {sieve_port}
  }}
  service_count = 0
  process_limit = 2
}}
plugin {{
  sieve = file:~/sieve;active=~/.dovecot.sieve
}}
service imap {{
  process_limit = 1000
}}
service pop3 {{
  process_limit = 1000
}}
{extra}
"""


def _children(pid):
    """PIDs of the processes whose parent is *pid*."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # The command name in parentheses may contain spaces.
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid):
    """True if *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _signal(pids, sig):
    """Send *sig* to those of *pids* still alive."""
    for pid in filter(_alive, pids):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Dovecot:
    """Configure, start and stop a private Dovecot in *tmpdir*.

    *users* maps user names to passwords (default: default_users()); *extra*
    is appended verbatim to the configuration file.  Ports are chosen by
    start() and are attributes afterwards: imap_port, pop3_port, imaps_port
    and pop3s_port, and sieve_port for ManageSieve.  cert_file is the server certificate and doubles as the
    CA file that clients verify it against (names localhost and 127.0.0.1).
    """

    def __init__(self, tmpdir, users=None, extra=""):
        self.tmpdir = os.path.abspath(os.fspath(tmpdir))
        self.users = dict(default_users() if users is None else users)
        self.extra = extra
        self.config_file = os.path.join(self.tmpdir, "dovecot.conf")
        self.log_file = os.path.join(self.tmpdir, "dovecot.log")
        self.stderr_file = os.path.join(self.tmpdir, "dovecot.stderr")
        self.cert_file = os.path.join(self.tmpdir, "cert.pem")
        self.key_file = os.path.join(self.tmpdir, "key.pem")
        self.mail_root = os.path.join(self.tmpdir, "mail")
        self.imap_port = self.pop3_port = None
        self.imaps_port = self.pop3s_port = None
        self.sieve_port = None      # ManageSieve (RFC 5804)
        self.proc = None
        pw = pwd.getpwnam(MAIL_USER)
        self._uid, self._gid = pw.pw_uid, pw.pw_gid
        self._serial = 0
        self._prepare()

    def _prepare(self):
        """Write users, maildirs and certificate, so add_message() works
        before start()."""
        os.makedirs(self.tmpdir, exist_ok=True)
        # The mail processes run as MAIL_USER and must reach their maildirs;
        # pytest's temporary directories are private to root.
        self._make_traversable(self.tmpdir)
        passwd = os.path.join(self.tmpdir, "users")
        with open(passwd, "w") as f:
            for name, password in self.users.items():
                # user:password:uid:gid:gecos:home -- the home is the sixth field.
                f.write(f"{name}:{{PLAIN}}{password}::::{self.maildir(name)}\n")
        self._mkdir(self.mail_root)
        for name in self.users:
            for sub in ("", "cur", "new", "tmp"):
                self._mkdir(os.path.join(self.maildir(name), sub))
        subprocess.run(
            ["openssl", "req", "-new", "-x509", "-nodes", "-days", "3650",
             "-newkey", "rsa:2048", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", self.key_file, "-out", self.cert_file],
            check=True, capture_output=True, timeout=60)

    @staticmethod
    def _make_traversable(path):
        """Let other users pass through *path* and its ancestors."""
        while True:
            mode = os.stat(path).st_mode
            if mode & 0o011 != 0o011:
                os.chmod(path, mode | 0o011)
            parent = os.path.dirname(path)
            if parent == path:
                return
            path = parent

    def _mkdir(self, path):
        os.makedirs(path, exist_ok=True)
        os.chown(path, self._uid, self._gid)

    def maildir(self, user):
        """The user's maildir (also the home directory Dovecot uses)."""
        return os.path.join(self.mail_root, user)

    def add_message(self, user, data):
        """Deliver *data* (bytes, an RFC 5322 message) to *user*'s INBOX.

        Works before and after start(): Dovecot notices new files in cur/.
        Returns the path of the message file.
        """
        self._serial += 1
        name = f"{int(time.time())}.P{os.getpid()}Q{self._serial}.localhost:2,"
        tmp = os.path.join(self.maildir(user), "tmp", name)
        with open(tmp, "wb") as f:
            f.write(data)
        os.chown(tmp, self._uid, self._gid)
        # Maildir delivery: write in tmp/, then rename, so Dovecot never
        # sees half a message.
        path = os.path.join(self.maildir(user), "cur", name)
        os.rename(tmp, path)
        return path

    def log(self):
        """Dovecot's log (and its stderr) so far, for failure messages."""
        text = []
        for path in (self.stderr_file, self.log_file):
            try:
                with open(path, errors="replace") as f:
                    text.append(f.read())
            except FileNotFoundError:
                pass
        return "".join(text)

    def _write_config(self):
        self.imap_port, self.pop3_port = free_port(), free_port()
        self.imaps_port, self.pop3s_port = free_port(), free_port()
        self.sieve_port = free_port()
        self._mkdir(os.path.join(self.tmpdir, "state"))
        with open(self.config_file, "w") as f:
            f.write(CONFIG.format(
                base_dir=os.path.join(self.tmpdir, "run"),
                state_dir=os.path.join(self.tmpdir, "state"),
                log_path=self.log_file,
                cert_file=self.cert_file,
                key_file=self.key_file,
                ssl_dh=(f"ssl_dh = <{SYSTEM_DH}"
                        if os.path.exists(SYSTEM_DH) else ""),
                mail_uid=self._uid,
                mail_gid=self._gid,
                passwd_file=os.path.join(self.tmpdir, "users"),
                imap_port=self.imap_port,
                imaps_port=self.imaps_port,
                pop3_port=self.pop3_port,
                pop3s_port=self.pop3s_port,
                sieve_port=self.sieve_port,
                extra=self.extra))

    def ports(self):
        """The four listening ports: IMAP, POP3, IMAPS, POP3S."""
        return (self.imap_port, self.pop3_port,
                self.imaps_port, self.pop3s_port)

    def start(self):
        """Start Dovecot; return once every port accepts and IMAP greets."""
        binary = dovecot_binary()
        if binary is None:
            raise RuntimeError("dovecot is not installed "
                               "(apt-get install -y dovecot-imapd dovecot-pop3d)")
        self._write_config()
        with open(self.stderr_file, "wb") as err:
            self.proc = subprocess.Popen(
                [binary, "-F", "-c", self.config_file],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            for port in self.ports() + (self.sieve_port,):
                self._wait_for_port(port, deadline)
            self._wait_for_greeting(deadline)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"Dovecot did not start: {exc}\n"
                               f"--- Dovecot log ---\n{self.log()}") from exc
        return self

    def _wait_for_port(self, port, deadline):
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}")
            if _accepts(port):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port} never accepted")
            time.sleep(0.02)

    def _wait_for_greeting(self, deadline):
        timeout = max(deadline - time.monotonic(), 0.1)
        with socket.create_connection(("127.0.0.1", self.imap_port),
                                      timeout=timeout) as s:
            greeting = s.makefile("rb").readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"unexpected IMAP greeting {greeting!r}")

    def stop(self):
        """Stop Dovecot and wait until its processes and ports are gone.

        Signalled alone, the master gives its children a second to exit, and
        a mail process with a client still connected outlives it by ten
        seconds; signalling the whole family at once stops it in an instant.
        """
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        family = _children(proc.pid)
        _signal([proc.pid, *family], signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and any(map(_alive, family)):
            time.sleep(0.02)
        _signal(family, signal.SIGKILL)
        for port in self.ports():
            while time.monotonic() < deadline and _accepts(port):
                time.sleep(0.02)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
