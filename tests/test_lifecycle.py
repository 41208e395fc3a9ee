"""perdition's life as a process: SIGHUP reloads a new generation of the
configuration while every established session carries on, a failed reload
changes nothing, SIGTERM and SIGINT stop gracefully (a -i session too),
and the pid file comes and goes with the process.

Every perdition here drops privileges as the manual says, so whatever it
reads again on SIGHUP -- configuration file, popmap, certificate and key --
is readable by nobody, as it must be on a real machine.
"""

import imaplib
import os
import pwd
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from dovecot import Dovecot, free_port
from helpers import (PERDITION, Perdition, RawClient, TIMEOUT, imap_connect,
                     perdition_env, pop3_connect, wait_until)
from support import (big_message, reaped, settled_usage, traversable,
                     wait_for_eof, wait_for_usage)

LOADED_SESSIONS = 120       # logged in, fetching mail across the reload
WAITING_SESSIONS = 100      # connected, not logged in yet (a fifth in TLS)
STORM_SECONDS = 20          # as long as the reproduction ran
STORM_INTERVAL = 0.002
RELOAD_SECONDS = 1.0        # how long the slow map takes to open
SERVICE = os.path.join(os.path.dirname(PERDITION), "service")
MAPS = os.path.join(os.path.dirname(PERDITION), "perdition_maps.py")


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    """Dovecot with a message of its own for each of the loaded users."""
    with Dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        for n in range(1, LOADED_SESSIONS + 1):
            server.add_message(f"user{n}", big_message(6000 + 50 * n, n))
        yield server


@pytest.fixture
def here(tmp_path):
    traversable(tmp_path)
    return tmp_path


def write(path, text):
    """Write a file perdition reads again, as nobody, on SIGHUP: replaced
    in one rename, as editors and configuration tools do."""
    new = str(path) + ".new"
    with open(new, "w") as f:
        f.write(text)
    os.chmod(new, 0o644)
    os.rename(new, path)
    return path


def certificate(directory, name):
    """A self-signed certificate for 127.0.0.1 with common name *name*:
    (certificate, key)."""
    cert, key = (os.path.join(directory, f"{name}.{kind}.pem")
                 for kind in ("crt", "key"))
    subprocess.run(["openssl", "req", "-x509", "-new", "-nodes", "-newkey",
                    "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-days", "30", "-subj", f"/CN={name}", "-addext",
                    "subjectAltName=IP:127.0.0.1", "-keyout", key,
                    "-out", cert], check=True, capture_output=True,
                   timeout=60)
    for path in (cert, key):
        os.chmod(path, 0o644)
    return cert, key


def peer_name(port, context=None):
    """The common name of the certificate perdition shows on STARTTLS."""
    context = context or ssl._create_unverified_context()
    with RawClient(port) as client:
        client.readline()
        client.send(b"s STARTTLS\r\n")
        assert client.readline().startswith(b"s OK")
        client.starttls(context, server_hostname=None)
        der = client.sock.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der)


def pem(path):
    with open(path) as f:
        return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(f.read()))


def login_line(port, user, password, tag=b"a"):
    """Log in over plaintext; the tagged answer line."""
    with RawClient(port) as client:
        client.readline()
        client.send(b"%s LOGIN %s %s\r\n" % (tag, user.encode(),
                                               password.encode()))
        line = client.readline()
        client.send(b"z LOGOUT\r\n")
        wait_for_eof(client)
    return line


def auth_servers(log, user):
    """The server= of each Auth line of *user*."""
    return [line.split('server="')[1].split('"')[0]
            for line in log.splitlines()
            if f'Auth: 127.0.0.1 user="{user}"' in line]


def configuration(cert, key, popmap, ok_line):
    return (f'ok_line "{ok_line}"\n'
            f"ssl_cert_file {cert}\nssl_key_file {key}\n"
            f"map_library posix_regex\nmap_library_opt {popmap}\n")


# ---------------------------------------------------------------------------
# SIGHUP: reload
# ---------------------------------------------------------------------------

def fetcher(port, n, reloaded, direct, errors, counts):
    """One logged-in session fetching its message again and again, until
    it has fetched twice after the reload; every fetch must be the bytes
    Dovecot gives directly."""
    try:
        client = imap_connect(port)
        client.login(f"user{n}", f"pw{n}")
        client.select("INBOX", readonly=True)
        after = 0
        while after < 2:
            late = reloaded.is_set()
            typ, data = client.fetch("1", "(BODY.PEEK[])")
            assert typ == "OK" and data[0][1] == direct[n], f"user{n}"
            counts[n] += 1
            after += late
            reloaded.wait(0.2)
        client.logout()
    except Exception as e:          # noqa: BLE001 -- reported by the test
        errors.append(f"user{n}: {e!r}")


def test_reload_under_load(here, dovecot):
    """SIGHUP with a new ok_line, certificate and popmap while hundreds of
    sessions are open: new connections see all three; sessions logged in
    before carry on and fetch exactly Dovecot's bytes; sessions that log
    in later on a connection made before the reload keep its generation."""
    one, two = certificate(here, "one"), certificate(here, "two")
    popmap = write(here / "popmap.re", f".* 127.0.0.1:{dovecot.imap_port}\n")
    conf = write(here / "perdition.conf",
                 configuration(*one, popmap, "generation one"))
    direct = {}
    for n in range(1, LOADED_SESSIONS + 1):
        client = imap_connect(dovecot.imap_port)
        client.login(f"user{n}", f"pw{n}")
        client.select("INBOX", readonly=True)
        direct[n] = client.fetch("1", "(BODY.PEEK[])")[1][0][1]
        client.logout()
    with Perdition(["-f", conf, "--ssl_mode", "tls_listen"], "IMAP4",
                   here) as proxy:
        assert peer_name(proxy.port) == pem(one[0])
        reloaded, errors = threading.Event(), []
        counts = dict.fromkeys(direct, 0)
        threads = [threading.Thread(target=fetcher, args=(
            proxy.port, n, reloaded, direct, errors, counts))
            for n in direct]
        for thread in threads:
            thread.start()
        waiting = []
        for n in range(WAITING_SESSIONS):
            client = RawClient(proxy.port)
            assert client.readline().startswith(b"* OK IMAP4 Ready")
            if n % 5 == 0:          # some in TLS already, on the old cert
                client.send(b"s STARTTLS\r\n")
                assert client.readline().startswith(b"s OK")
                client.starttls(ssl._create_unverified_context(), None)
            waiting.append(client)
        wait_until(lambda: all(counts.values()) or errors, 60,
                   "every loaded session fetching")
        assert not errors

        write(popmap, f".* localhost:{dovecot.imap_port}\n")
        write(conf, configuration(*two, popmap, "generation two"))
        log = proxy.reload()
        assert "]: Reloaded: generation 2" in log, log
        reloaded.set()

        # New connections: all three changes.
        assert peer_name(proxy.port) == pem(two[0])
        assert login_line(proxy.port, "alice", "alicepw") == \
            b"a OK generation two\r\n"
        assert auth_servers(proxy.log(), "alice") == ["localhost"]

        # Connections made before: the generation they started with.
        for n, client in enumerate(waiting):
            user = f"user{150 + n % 50}"
            client.send(b"w LOGIN %s pw%s\r\n" % (user.encode(),
                                                   user[4:].encode()))
        for client in waiting:
            assert client.readline() == b"w OK generation one\r\n"
            client.send(b"z LOGOUT\r\n")
            assert b"z OK" in wait_for_eof(client)
            client.close()
        assert set(auth_servers(proxy.log(), "user150")) == {"127.0.0.1"}

        for thread in threads:
            thread.join(60)
        assert not errors and all(n >= 3 for n in counts.values())
    log = proxy.log()
    assert log.count("]: Connect: ") == log.count("]: Close: ")
    assert "Stopped: 0 sessions were open" in log


@pytest.mark.parametrize("fault", ["line", "certificate", "popmap", "gdbm",
                                   "sqlite"])
def test_failed_reload_keeps_the_old_generation(here, dovecot, fault):
    """A bad line, an unreadable certificate, a popmap that does not
    open, a gdbm map whose database is missing or an sqlite map whose file
    is no database (both read at each lookup, so read once at the reload
    to see that they can be): the reload changes nothing, and the log says
    why with FILE:LINE (or the file)."""
    cert, key = certificate(here, "one")
    popmap = write(here / "popmap.re", f".* 127.0.0.1:{dovecot.imap_port}\n")
    conf = write(here / "perdition.conf",
                 configuration(cert, key, popmap, "generation one"))
    with Perdition(["-f", conf, "--ssl_mode", "tls_listen"], "IMAP4",
                   here) as proxy:
        changed = configuration(cert, key, popmap, "generation two")
        if fault == "line":
            write(conf, changed + "no_such_option 1\n")
            reason = f"{conf}:6: unknown option 'no_such_option'"
        elif fault == "certificate":
            write(conf, changed.replace(cert, cert + ".gone"))
            reason = f"--ssl_cert_file: {cert}.gone: No such file"
        elif fault == "popmap":
            write(popmap, f".* 127.0.0.1:{dovecot.imap_port}\n(unclosed x\n")
            write(conf, changed)
            reason = f"{popmap}:2:"
        elif fault == "gdbm":
            database = here / "popmap.db"       # never made
            write(conf, changed.replace(
                f"map_library posix_regex\nmap_library_opt {popmap}",
                f"map_library gdbm\nmap_library_opt {database}"))
            reason = f"option -M, --map_library gdbm: {database}: " \
                "cannot open database: "
        else:
            database = write(here / "popmap.sqlite", "alice 127.0.0.1\n")
            write(conf, changed.replace(
                f"map_library posix_regex\nmap_library_opt {popmap}",
                f"map_library sqlite\nmap_library_opt {database}"))
            reason = f"option -M, --map_library sqlite: {database}: " \
                "file is not a database"
        log = proxy.reload()
        assert "]: Reload failed, keeping generation 1: " in log
        assert reason in log.split("Reload failed")[1].splitlines()[0]
        assert login_line(proxy.port, "alice", "alicepw") == \
            b"a OK generation one\r\n"
        assert peer_name(proxy.port) == pem(cert)
        # Once the file is right again, the next SIGHUP takes it.
        write(popmap, f".* 127.0.0.1:{dovecot.imap_port}\n")
        write(conf, changed)
        assert "]: Reloaded: generation 2" in proxy.reload()
        assert login_line(proxy.port, "bob", "bobpw") == \
            b"a OK generation two\r\n"


def test_a_map_that_cannot_be_read_at_start_up_is_logged(here, dovecot):
    """A gdbm map whose database is not there yet at start-up: perdition
    starts all the same and says so, -s serves every login meanwhile, and
    once the database is made its answers count, with no reload (it is
    opened at each lookup)."""
    database = here / "popmap.db"
    with Perdition(["-s", f"127.0.0.1:{dovecot.imap_port}", "-M", "gdbm",
                    "-m", database], "IMAP4", here) as proxy:
        log = proxy.wait_for_log("]: Listening on ")
        assert "]: Map gdbm cannot be read now, lookups fail until it can: " \
            f"{database}: cannot open database: " in log
        assert login_line(proxy.port, "alice", "alicepw").startswith(b"a OK")
        assert auth_servers(proxy.log(), "alice") == ["127.0.0.1"]
        source = write(here / "popmap",
                       f"bob: localhost:{dovecot.imap_port}\n")
        subprocess.run([sys.executable, MAPS, "makedb", source, database],
                       check=True, capture_output=True, timeout=TIMEOUT)
        for name in os.listdir(here):
            if name.startswith(database.name):
                os.chmod(here / name, 0o644)
        assert login_line(proxy.port, "bob", "bobpw").startswith(b"a OK")
        assert auth_servers(proxy.log(), "bob") == ["localhost"]


def test_a_log_file_that_cannot_be_opened_fails_the_reload(here, dovecot):
    """A new log_facility that cannot be opened fails the reload as a
    whole: the rest of the new file does not go live either (the old
    ok_line still answers), and the log, still where it was, says why.
    (The new generation used to go live, logging to the old file.)"""
    proxy = Perdition([], "IMAP4", here, dovecot.imap_port)
    at = proxy.args.index("-F")         # -F comes from the file here
    del proxy.args[at:at + 2]
    conf = write(here / "perdition.conf", f"log_facility {proxy.log_file}\n"
                                          'ok_line "generation one"\n')
    proxy.args += ["-f", conf]
    with proxy:
        write(conf, "log_facility /nonexistent/dir/x.log\n"
                    'ok_line "generation two"\n')
        log = proxy.reload()
        assert "]: Reload failed, keeping generation 1: option -F, " \
            "--log_facility: /nonexistent/dir/x.log: No such file or " \
            "directory\n" in log
        assert "Reloaded" not in log
        assert login_line(proxy.port, "alice", "alicepw") == \
            b"a OK generation one\r\n"
        proxy.wait_for_log('Close: 127.0.0.1 user="alice"')
        # Once the file is right again, the next SIGHUP takes it.
        write(conf, f"log_facility {proxy.log_file}\n"
                    'ok_line "generation two"\n')
        assert "]: Reloaded: generation 2 " in proxy.reload()
        assert login_line(proxy.port, "bob", "bobpw") == \
            b"a OK generation two\r\n"
    assert not os.path.exists("/nonexistent/dir")


def read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def alive(pid):
    """True if *pid* exists and is not a zombie (a daemon is not our
    child: whoever adopted it reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def relative_configuration(ok_line):
    return (f'ok_line "{ok_line}"\n'
            "map_library posix_regex\nmap_library_opt popmap.re\n")


def test_daemon_reloads_the_files_its_relative_paths_name(here, dovecot):
    """A daemon (no --no_daemon) started in the directory of its files
    with a relative -f, whose file names its popmap relatively too: it
    keeps its working directory, so a SIGHUP reads the same files again
    -- a new ok_line and a new popmap answer the next login.  (It used to
    go to /, and the reload failed: "perdition.conf: No such file or
    directory".)"""
    env = perdition_env(str(here))
    port = free_port()
    log_file = here / "daemon.log"
    pid_file = os.path.join(env["PERDITION_VAR_STATE_DIR"], "perdition",
                            "perdition.pid")
    write(here / "popmap.re", f".* 127.0.0.1:{dovecot.imap_port}\n")
    write(here / "perdition.conf", relative_configuration("generation one"))
    started = subprocess.run(
        [sys.executable, PERDITION, "-P", "IMAP4", "-f", "perdition.conf",
         "-F", str(log_file), "-b", "127.0.0.1", "-l", str(port),
         "--auth_failure_delay", "0"], cwd=here, env=env,
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    assert started.returncode == 0, started.stderr     # the parent returns
    try:
        wait_until(lambda: read_text(pid_file).endswith("\n"),
                   what="pid file")
    except AssertionError:      # stopped all the same, by its log's pid
        named = re.search(r" perdition\[(\d+)\]: ", read_text(log_file))
        if named:
            os.kill(int(named.group(1)), signal.SIGTERM)
        raise
    pid = int(read_text(pid_file))
    try:
        wait_until(lambda: "]: Listening on " in read_text(log_file),
                   what="the daemon listening")
        assert os.readlink(f"/proc/{pid}/cwd") == str(here)
        assert login_line(port, "alice", "alicepw") == \
            b"a OK generation one\r\n"
        write(here / "popmap.re", f".* localhost:{dovecot.imap_port}\n")
        write(here / "perdition.conf",
              relative_configuration("generation two"))
        os.kill(pid, signal.SIGHUP)
        wait_until(lambda: "]: Reload" in read_text(log_file),
                   what="the reload logged")
        log = read_text(log_file)
        assert "]: Reloaded: generation 2 " in log, log
        assert login_line(port, "bob", "bobpw") == b"a OK generation two\r\n"
        assert auth_servers(read_text(log_file), "bob") == ["localhost"]
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), what="the daemon's exit")
    assert "]: Stopped: " in read_text(log_file)
    assert not os.path.exists(pid_file)


def test_restart_only_options_keep_their_values(here, dovecot):
    """Options that need a restart keep their running values; the log
    names each one the new file changes, and the rest of it applies."""
    proxy = Perdition([], "IMAP4", here, dovecot.imap_port)
    # Protocol and port come from the file here, not the command line.
    for name in ("-P", "-l"):
        i = proxy.args.index(name)
        del proxy.args[i:i + 2]
    pid_file = here / "run" / "imap" / "perdition.pid"
    before = (f"protocol IMAP4\nlisten_port {proxy.port}\n"
              f"pid_file {pid_file}\n")
    conf = write(here / "perdition.conf", before + 'ok_line "one"\n')
    proxy.args += ["-f", conf]
    with proxy:
        write(conf, f"protocol POP3\nlisten_port {proxy.port + 1}\n"
                    f"pid_file {pid_file}.new\nusername daemon\n"
                    f"group daemon\ninetd_mode\nno_daemon\n"
                    f"authenticate_in\n"
                    'ok_line "two"\n')
        log = proxy.reload()
        for name, value in [("protocol", '"IMAP4"'),
                            ("listen_port", str(proxy.port)),
                            ("pid_file", f'"{pid_file}"'),
                            ("username", '"nobody"'), ("group", '"nobody"'),
                            ("inetd_mode", "False"),
                            ("authenticate_in", "False")]:
            assert f"]: Reload: option --{name} cannot change without a " \
                f"restart; keeping {value}\n" in log
        assert "option --no_daemon" not in log      # on the command line
        assert "]: Reloaded: generation 2" in log
        assert login_line(proxy.port, "alice", "alicepw") == b"a OK two\r\n"
        assert pid_file.exists() and not os.path.exists(f"{pid_file}.new")
    assert not pid_file.exists()


def storm_login(port, context, stop, errors, logins):
    """TLS logins, one after the other, until *stop*."""
    while not stop.is_set():
        try:
            client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context,
                                       timeout=TIMEOUT)
            client.login("alice", "alicepw")
            client.logout()
            logins.append(1)
        except Exception as e:      # noqa: BLE001 -- reported by the test
            errors.append(repr(e))
            return


def test_sighup_storm_during_tls_logins(here, dovecot):
    """A SIGHUP every few milliseconds for 20 s while clients log in over
    TLS through a popmap: perdition keeps serving (today's handler logged
    and could deadlock on the log's lock), and SIGTERM afterwards stops it
    within the grace period."""
    cert, key = certificate(here, "one")
    popmap = write(here / "popmap.re", f".* 127.0.0.1:{dovecot.imap_port}\n")
    conf = write(here / "perdition.conf",
                 configuration(cert, key, popmap, "storm"))
    context = ssl.create_default_context(cafile=cert)
    with Perdition(["-f", conf, "--ssl_mode", "ssl_listen",
                    "--shutdown_timeout", "5"], "IMAP4S", here) as proxy:
        stop, errors, logins = threading.Event(), [], []
        clients = [threading.Thread(target=storm_login, args=(
            proxy.port, context, stop, errors, logins)) for _ in range(4)]
        for client in clients:
            client.start()
        sent, deadline = 0, time.monotonic() + STORM_SECONDS
        while time.monotonic() < deadline and not errors:
            os.kill(proxy.pid, signal.SIGHUP)
            sent += 1
            time.sleep(STORM_INTERVAL)
        stop.set()
        for client in clients:
            client.join(TIMEOUT)
        assert not errors, errors[:3]
        assert len(logins) > 50 and sent > 1000
        # Still answering at once after the storm, and no reload is lost:
        # the last request was followed by one more reload.
        assert "]: Reloaded: generation" in proxy.reload()
        client = imaplib.IMAP4_SSL("127.0.0.1", proxy.port,
                                   ssl_context=context, timeout=TIMEOUT)
        assert client.login("bob", "bobpw") == ("OK", [b"storm"])
        client.logout()
        with RawClient(proxy.port) as raw:
            raw.starttls(context, "127.0.0.1")
            assert raw.readline().startswith(b"* OK IMAP4 Ready")
            os.kill(proxy.pid, signal.SIGTERM)
            assert proxy.proc.wait(5 + 5) == 0      # the grace, and more
            assert raw.readline() == b"* BYE Server shutting down\r\n"
    log = proxy.log()
    # One reload at a time, and the requests made during one fold into one.
    assert 0 < log.count("]: Reloaded: generation") < sent
    assert "Reload failed" not in log
    assert "Stopped: 1 sessions were open, 0 finished in the grace period, " \
        "1 ended\n" in log
    assert log.count("]: Connect: ") == log.count("]: Close: ")


SLOW_MAP = '''"""A map slow to open, which notes when each opening starts
and ends."""
import time

from perdition_maps import Map as BaseMap


def note(what):
    with open({marks!r}, "a") as f:
        f.write(what + "\\n")


class Map(BaseMap):
    def __init__(self, option):
        super().__init__(option)
        note("start")
        time.sleep({seconds})
        note("end")

    def lookup(self, key, context):
        return None
'''


def sighup_taken(pid, timeout=TIMEOUT):
    """Wait until *pid* has taken the SIGHUP sent to it (none pending): a
    SIGHUP sent after that is a signal of its own, not merged into this
    one by the kernel."""
    bit = 1 << (signal.SIGHUP - 1)
    deadline = time.monotonic() + timeout
    while True:
        with open(f"/proc/{pid}/status") as f:
            pending = [int(line.split()[1], 16) for line in f
                       if line.startswith(("SigPnd:", "ShdPnd:"))]
        if not any(mask & bit for mask in pending):
            return
        assert time.monotonic() < deadline, "SIGHUP still pending"
        time.sleep(0.001)


def test_sighups_during_a_reload_fold_into_one_more(here, dovecot):
    """Ten SIGHUPs while a reload runs (its map takes a second to open)
    make exactly one more reload, after that one: one reload at a time,
    the requests made meanwhile folded into one, none lost.  Each SIGHUP
    is sent once the one before has been taken, so that perdition sees
    ten, not one the kernel merged them into.  The storm test above shows
    only that fewer reloads than signals ran."""
    marks = here / "marks"
    marks.touch()
    marks.chmod(0o666)                  # written by nobody at a reload
    slow = write(here / "slow_map.py", SLOW_MAP.format(
        marks=str(marks), seconds=RELOAD_SECONDS))
    conf = write(here / "perdition.conf", 'ok_line "folded"\n')

    def notes():
        return marks.read_text().split()

    with Perdition(["-f", conf, "-s", f"127.0.0.1:{dovecot.imap_port}",
                    "-M", slow], "IMAP4", here) as proxy:
        assert notes() == ["start", "end"]          # at start-up
        os.kill(proxy.pid, signal.SIGHUP)
        wait_until(lambda: len(notes()) == 3, what="the reload's map opening")
        for _ in range(10):
            os.kill(proxy.pid, signal.SIGHUP)
            sighup_taken(proxy.pid)
        assert notes() == ["start", "end", "start"], \
            "a reload ended or began during the burst"
        proxy.wait_for_log("]: Reloaded: generation 3 ", timeout=TIMEOUT)
        # A reload asked for before that one ended would start at once;
        # none must, and no event shows an absence: wait one reload's time.
        time.sleep(RELOAD_SECONDS + 0.5)
        log = proxy.log()
        assert log.count("]: Reloaded: ") == 2 and "Reload failed" not in log
        assert notes() == ["start", "end"] * 3      # never two at once
        assert login_line(proxy.port, "alice", "alicepw") == \
            b"a OK folded\r\n"


@pytest.mark.parametrize("configuration", ["good", "broken"])
def test_renamed_log_file_then_sighup_logs_to_a_new_file(here, dovecot,
                                                        configuration):
    """As logrotate does it: rename the file, create a new one for the user
    perdition runs as, send SIGHUP: later lines go to the new file, even
    when the configuration file has gone bad meanwhile (the reload fails,
    the log is still reopened)."""
    conf = write(here / "perdition.conf", 'ok_line "fine"\n')
    with Perdition(["-f", conf], "IMAP4", here, dovecot.imap_port) as proxy:
        login_line(proxy.port, "alice", "alicepw")
        if configuration == "broken":
            write(conf, 'ok_line "unterminated\n')
        rotated = proxy.log_file + ".1"
        os.rename(proxy.log_file, rotated)
        nobody = pwd.getpwnam("nobody")
        fd = os.open(proxy.log_file, os.O_CREAT | os.O_WRONLY, 0o640)
        os.fchown(fd, nobody.pw_uid, nobody.pw_gid)
        os.close(fd)
        log = proxy.reload()
        assert ("]: Reloaded: generation 2" if configuration == "good" else
                f"]: Reload failed, keeping generation 1: {conf}:1: ") in log
        assert login_line(proxy.port, "bob", "bobpw") == b"a OK fine\r\n"
        proxy.wait_for_log('Close: 127.0.0.1 user="bob"')
    with open(rotated) as f:
        old = f.read()
    assert 'user="alice"' in old and "bob" not in old
    assert "Reload" not in old
    assert "Exiting on signal" in proxy.log()


def test_shipped_logrotate_snippet(here, dovecot):
    """service/logrotate, run by the real logrotate with the paths of this
    test: the log is rotated, the new file made for nobody, and perdition,
    sent SIGHUP through its pid file, writes there from then on."""
    with Perdition([], "IMAP4", here, dovecot.imap_port) as proxy:
        proxy.wait_for_log("Listening on ")         # the pid file is in
        login_line(proxy.port, "alice", "alicepw")
        proxy.wait_for_log('Close: 127.0.0.1 user="alice"')
        with open(os.path.join(SERVICE, "logrotate")) as f:
            snippet = f.read()
        assert "/var/log/perdition.log {" in snippet
        # perdition.imap4 ... keep theirs in /var/run/perdition.imap4/
        assert "/var/run/perdition*/*.pid" in snippet
        snippet = snippet.replace("/var/log/perdition.log", proxy.log_file) \
            .replace("/var/run", proxy.env["PERDITION_VAR_STATE_DIR"])
        conf = write(here / "logrotate.conf", snippet)
        subprocess.run(["logrotate", "-f", "-s", str(here / "state"),
                        str(conf)], check=True, capture_output=True,
                       timeout=TIMEOUT)
        rotated = proxy.log_file + ".1"
        assert os.path.exists(rotated)      # delaycompress: not yet
        stat = os.stat(proxy.log_file)
        assert (stat.st_uid, stat.st_mode & 0o777) == \
            (pwd.getpwnam("nobody").pw_uid, 0o640)
        proxy.wait_for_log("Reloaded: generation 2")
        login_line(proxy.port, "bob", "bobpw")
        proxy.wait_for_log('Close: 127.0.0.1 user="bob"')
    with open(rotated) as f:
        old = f.read()
    assert 'user="alice"' in old and "bob" not in old


def test_no_thread_or_descriptor_leaked_across_reloads(here, dovecot):
    """50 reloads, each with a popmap, TLS contexts and a session in
    between: perdition holds no more threads or descriptors than before."""
    cert, key = certificate(here, "one")
    popmap = write(here / "popmap.re", f".* 127.0.0.1:{dovecot.imap_port}\n")
    conf = write(here / "perdition.conf",
                 configuration(cert, key, popmap, "leak"))
    with Perdition(["-f", conf, "--ssl_mode", "tls_listen"], "IMAP4",
                   here) as proxy:
        login_line(proxy.port, "alice", "alicepw")
        baseline = settled_usage(proxy)
        for n in range(2, 52):
            assert f"]: Reloaded: generation {n} " in proxy.reload()
            assert login_line(proxy.port, "alice", "alicepw") == \
                b"a OK leak\r\n"
        wait_for_usage(proxy, baseline)


# ---------------------------------------------------------------------------
# SIGTERM and SIGINT: graceful stop
# ---------------------------------------------------------------------------

def logged_in(port, user="alice", password="alicepw"):
    client = RawClient(port)
    client.readline()
    client.send(b"a LOGIN %s %s\r\n" % (user.encode(), password.encode()))
    assert client.readline().startswith(b"a OK")
    client.send(b"b SELECT INBOX\r\n")
    assert client.read_until(b"b OK").endswith(b"b OK")
    client.readline()
    return client


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_lets_sessions_finish_then_ends_the_rest(here, dovecot, signum):
    """The listening socket closes at once; a session that ends within
    --shutdown_timeout is complete; one still before login gets its
    farewell and a logged-in one is closed; the pid file goes, the exit
    status is 0, and every session has its Close line."""
    with Perdition(["--shutdown_timeout", "3"], "IMAP4", here,
                   dovecot.imap_port) as proxy:
        pid_file = os.path.join(proxy.env["PERDITION_VAR_STATE_DIR"],
                                "perdition", "perdition.pid")
        proxy.wait_for_log("Listening on ")     # written by then
        assert os.path.exists(pid_file)
        finishing, idle = logged_in(proxy.port, "user1", "pw1"), \
            logged_in(proxy.port, "user2", "pw2")
        waiting = RawClient(proxy.port)
        assert waiting.readline().startswith(b"* OK")
        started = time.monotonic()
        os.kill(proxy.pid, signum)
        proxy.wait_for_log("Exiting on signal")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), 1)
        # In the grace period the session finishes its work.
        finishing.send(b"c FETCH 1 BODY.PEEK[]\r\n")
        fetched = finishing.read_until(b"c OK")
        assert big_message(6050, 1) in fetched
        finishing.send(b"d LOGOUT\r\n")
        assert b"d OK" in wait_for_eof(finishing)
        assert wait_for_eof(waiting) == b"* BYE Server shutting down\r\n"
        assert wait_for_eof(idle) == b""
        assert proxy.proc.wait(TIMEOUT) == 0
        assert time.monotonic() - started >= 3
    log = proxy.log()
    assert "Exiting on signal %s: 3 sessions open, 3 s to finish\n" \
        % signum.name in log
    assert "Stopped: 3 sessions were open, 1 finished in the grace period, " \
        "2 ended\n" in log
    assert log.count("]: Connect: ") == log.count("]: Close: ")
    assert not os.path.exists(pid_file)


def test_pop3_farewell_and_an_immediate_stop(here, dovecot):
    """--shutdown_timeout 0 ends every session at once; a POP3 client
    before login is told -ERR."""
    with Perdition(["--shutdown_timeout", "0"], "POP3", here,
                   dovecot.pop3_port) as proxy:
        client = pop3_connect(proxy.port)
        os.kill(proxy.pid, signal.SIGTERM)
        assert proxy.proc.wait(TIMEOUT) == 0
        with pytest.raises(Exception) as error:     # poplib: error_proto
            client.user("alice")
        assert "-ERR Server shutting down" in str(error.value)
    assert "Stopped: 1 sessions were open, 0 finished in the grace " \
        "period, 1 ended\n" in proxy.log()


def test_second_signal_ends_at_once(here, dovecot):
    with Perdition(["--shutdown_timeout", "600"], "IMAP4", here,
                   dovecot.imap_port) as proxy:
        idle = logged_in(proxy.port)
        os.kill(proxy.pid, signal.SIGTERM)
        proxy.wait_for_log("Exiting on signal SIGTERM: 1 sessions open, "
                           "600 s to finish")
        started = time.monotonic()
        os.kill(proxy.pid, signal.SIGINT)
        assert proxy.proc.wait(TIMEOUT) == 0
        assert time.monotonic() - started < 5
        assert wait_for_eof(idle) == b""
    assert "Stopped: 1 sessions were open, 0 finished in the grace period, " \
        "1 ended\n" in proxy.log()


# ---------------------------------------------------------------------------
# -i: one session, under the same signals
# ---------------------------------------------------------------------------

GREETINGS = {"IMAP4": b"* OK IMAP4 Ready", "POP3": b"+OK POP3 Ready"}


def inetd(here, dovecot, protocol, *args):
    """perdition -i on one end of a socketpair, as a supervisor (socat,
    stunnel, systemd's Accept=yes) starts it: (process, our end, a reader
    of it, the log), once the greeting has been read -- by then perdition
    watches its signals."""
    ours, theirs = socket.socketpair()
    port = dovecot.imap_port if protocol == "IMAP4" else dovecot.pop3_port
    log = here / "inetd.log"
    with theirs, open(here / "inetd.err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, PERDITION, "-P", protocol, "-i", "-F", str(log),
             "-s", f"127.0.0.1:{port}", "-M", "", "--auth_failure_delay",
             "0", *args], stdin=theirs, stdout=theirs, stderr=err,
            env=perdition_env(str(here)))
    ours.settimeout(TIMEOUT)
    reader = ours.makefile("rb")
    try:
        assert reader.readline().startswith(GREETINGS[protocol])
    except BaseException:
        proc.kill()
        proc.wait()
        ours.close()
        raise
    return proc, ours, reader, log


@pytest.mark.parametrize("protocol, farewell", [
    ("IMAP4", b"* BYE Server shutting down\r\n"),
    ("POP3", b"-ERR Server shutting down\r\n")], ids=["IMAP4", "POP3"])
def test_inetd_session_stops_gracefully_on_sigterm(here, dovecot, protocol,
                                                   farewell):
    """perdition -i watches SIGTERM as the server does: a client still
    before its login gets the farewell once --shutdown_timeout is over,
    the session its Close line, and the exit status is 0.  (SIGTERM used
    to kill it mid-session: no word to the client, no Close line.)"""
    proc, client, reader, log = inetd(here, dovecot, protocol,
                                      "--shutdown_timeout", "1")
    with reaped(proc):
        with client:
            started = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            assert reader.read() == farewell    # and then the end
            assert time.monotonic() - started >= 1      # the grace
        assert proc.wait(TIMEOUT) == 0
    text = log.read_text()
    assert f"]: Connect: unknown[inetd_pid={proc.pid}]\n" in text
    assert ']: Close: unknown user="" received=' in text
    assert "]: Exiting on signal SIGTERM: 1 sessions open, 1 s to finish\n" \
        in text
    assert "]: Stopped: 1 sessions were open, 0 finished in the grace " \
        "period, 1 ended\n" in text
    assert (here / "inetd.err").read_bytes() == b""


def test_inetd_session_finishes_in_the_grace_period(here, dovecot):
    """SIGTERM during a logged-in -i session: the client goes on working
    in the grace period, and perdition exits (status 0) as soon as the
    session ends, long before --shutdown_timeout."""
    proc, client, reader, log = inetd(here, dovecot, "IMAP4",
                                      "--shutdown_timeout", "600")
    with reaped(proc):
        with client:
            client.sendall(b"a LOGIN alice alicepw\r\n")
            assert reader.readline() == b"a OK You are so in\r\n"
            os.kill(proc.pid, signal.SIGTERM)
            wait_until(lambda: "]: Exiting on signal SIGTERM: " in
                       log.read_text() or proc.poll() is not None,
                       what="the stop begun")
            assert proc.poll() is None, "ended at once"
            client.sendall(b"b NOOP\r\n")
            assert reader.readline().startswith(b"b OK")
            client.sendall(b"c LOGOUT\r\n")
            assert b"\r\nc OK" in reader.read()
        assert proc.wait(TIMEOUT) == 0
    text = log.read_text()
    assert 'Close: unknown user="alice" received=' in text
    assert "]: Stopped: 1 sessions were open, 1 finished in the grace " \
        "period, 0 ended\n" in text


def test_sighup_changes_nothing_under_inetd(here, dovecot):
    """SIGHUP to perdition -i, with one session to serve and no
    configuration to keep: the session carries on, and the login after
    it works.  (SIGHUP used to kill it.)"""
    proc, client, reader, log = inetd(here, dovecot, "IMAP4")
    with reaped(proc):
        with client:
            os.kill(proc.pid, signal.SIGHUP)
            client.sendall(b"a LOGIN alice alicepw\r\n")
            assert reader.readline() == b"a OK You are so in\r\n"
            client.sendall(b"b LOGOUT\r\n")
            assert b"\r\nb OK" in reader.read()
        assert proc.wait(TIMEOUT) == 0
    text = log.read_text()
    assert 'Close: unknown user="alice" received=' in text
    assert "Reload" not in text
