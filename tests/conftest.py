"""Fixtures shared by the tests: a real Dovecot back-end and perdition
processes started on demand."""

import pytest

from dovecot import Dovecot, dovecot_binary
from helpers import Perdition


def pytest_sessionstart(session):
    """Without Dovecot there is no back-end to proxy to, and every test that
    matters would be skipped or meaningless: refuse to run instead."""
    if dovecot_binary() is None:
        pytest.exit("dovecot is not installed; run: "
                    "apt-get install -y dovecot-imapd dovecot-pop3d",
                    returncode=1)


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory):
    """A private Dovecot (users alice, bob, user1..user200) for one module."""
    with Dovecot(tmp_path_factory.mktemp("dovecot")) as server:
        yield server


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
