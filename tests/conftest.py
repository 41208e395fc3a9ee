"""Fixtures shared by the tests: a real Dovecot back-end and perdition
processes started on demand."""

import os
import shutil
import subprocess
import tempfile

import pytest

from dovecot import Dovecot, dovecot_binary, managesieve_binary
from haproxy import haproxy_binary
from helpers import Perdition


def pytest_configure(config):
    """Each run gets a base directory of its own.  pytest's shared
    /tmp/pytest-of-<user> is made private (0700) again by every run, which
    would cut Dovecot's and perdition's unprivileged users off from the
    files of another run going on at the same time."""
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="perdition-tests-")
        config.own_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    if getattr(config, "own_basetemp", None):
        shutil.rmtree(config.own_basetemp, ignore_errors=True)


PACKAGES = ["dovecot-imapd", "dovecot-pop3d", "dovecot-managesieved",
            "sieve-connect", "curl", "openssl", "haproxy", "systemd",
            "logrotate"]


def missing_programs():
    """The real programs the suite drives that this machine lacks."""
    found = {"dovecot": dovecot_binary(), "curl": shutil.which("curl"),
             "openssl": shutil.which("openssl"), "haproxy": haproxy_binary(),
             "systemd-socket-activate": shutil.which(
                 "systemd-socket-activate", path="/usr/bin"),
             "logrotate": shutil.which("logrotate", path="/usr/sbin"),
             "sieve-connect": shutil.which("sieve-connect"),
             "dovecot-managesieved": managesieve_binary()}
    return [name for name, path in found.items() if path is None]


def pytest_sessionstart(session):
    """Without Dovecot there is no back-end to proxy to, and every test that
    matters would be skipped or meaningless: install what is missing when
    we may (root with apt-get), else refuse to run and say what to
    install."""
    if missing_programs() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq"] + PACKAGES,
                       env=env, check=False)
    missing = missing_programs()
    if missing:
        pytest.exit("the tests need %s; run: apt-get install -y %s"
                    % (", ".join(missing), " ".join(PACKAGES)), returncode=1)


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    """A private Dovecot (users alice, bob, user1..user200) for one module."""
    with Dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory for the perdition processes one module shares."""
    return tmp_path_factory.mktemp("perdition")


@pytest.fixture
def perdition_factory(tmp_path):
    """Start perdition processes: ``perdition_factory(args, protocol="IMAP4",
    backend_port=None)`` returns a started Perdition; all are stopped when
    the test ends."""
    started = []

    def start(args=(), protocol="IMAP4", backend_port=None):
        perdition = Perdition(list(args), protocol, tmp_path, backend_port)
        perdition.start()
        started.append(perdition)
        return perdition

    yield start
    for perdition in started:
        perdition.stop()
