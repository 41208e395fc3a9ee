"""The Dovecot fixture is a working back-end: every other test relies on it,
so a broken fixture must show up here rather than as a perdition bug."""

import imaplib
import poplib
import ssl

import pytest

from helpers import imap_connect, pop3_connect, TIMEOUT

MESSAGE = b"From: bob@localhost\r\nSubject: fixture\r\n\r\nHello alice.\r\n"


def test_imap_login_sees_added_message(dovecot):
    imap = imap_connect(dovecot.imap_port)
    try:
        imap.login("alice", "alicepw")
        typ, data = imap.select("INBOX")
        before = int(data[0])
        dovecot.add_message("alice", MESSAGE)
        typ, data = imap.select("INBOX")
        assert typ == "OK" and int(data[0]) == before + 1
        typ, data = imap.fetch(data[0], "(BODY.PEEK[])")
        assert data[0][1] == MESSAGE
    finally:
        imap.logout()


def test_imap_rejects_wrong_password(dovecot):
    imap = imap_connect(dovecot.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("alice", "wrong")
    finally:
        imap.logout()


def test_user_names_are_exact(dovecot):
    imap = imap_connect(dovecot.imap_port)
    try:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("Alice", "alicepw")
    finally:
        imap.logout()


def test_pop3_user_pass_stat(dovecot):
    dovecot.add_message("bob", MESSAGE)
    pop = pop3_connect(dovecot.pop3_port)
    try:
        pop.user("bob")
        pop.pass_("bobpw")
        count, size = pop.stat()
        assert count >= 1 and size >= len(MESSAGE)
    finally:
        pop.quit()


def test_imaps_verifies_as_localhost(dovecot):
    context = ssl.create_default_context(cafile=dovecot.cert_file)
    imap = imaplib.IMAP4_SSL("localhost", dovecot.imaps_port,
                             ssl_context=context, timeout=TIMEOUT)
    try:
        assert imap.login("user7", "pw7")[0] == "OK"
    finally:
        imap.logout()


def test_pop3s_verifies_as_ip_address(dovecot):
    context = ssl.create_default_context(cafile=dovecot.cert_file)
    pop = poplib.POP3_SSL("127.0.0.1", dovecot.pop3s_port, context=context,
                          timeout=TIMEOUT)
    try:
        pop.user("user200")
        assert pop.pass_("pw200").startswith(b"+OK")
    finally:
        pop.quit()
