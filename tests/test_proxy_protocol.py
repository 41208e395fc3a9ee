r"""The PROXY protocol on the listening side (issue 11, part 1): behind a
real HAProxy (send-proxy and send-proxy-v2) perdition logs, maps and
rewrites with the client's address, not the balancer's; bad, untrusted or
missing headers close the connection with a reason in the log.

The clients connect from 127.0.0.5 so that the real client and the
balancer (127.0.0.1) differ; the popmap is keyed by \i, so a login lands
on Dovecot only when the map saw the client's address.
"""

import ipaddress
import os
import ssl
import struct

import pytest

from dovecot import Dovecot
from haproxy import HAProxy
from helpers import RawClient
from support import log_in_and_out, wait_for_eof

CLIENT = "127.0.0.5"
V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source, destination, command=0x21, family=0x11, extra=b""):
    body = b"".join(ipaddress.ip_address(a).packed
                    for a in (source[0], destination[0]))
    body += struct.pack("!HH", source[1], destination[1]) + extra
    return V2 + bytes([command, family]) + struct.pack("!H", len(body)) \
        + body


@pytest.fixture
def mapdir(tmp_path):
    Dovecot._make_traversable(str(tmp_path))
    return tmp_path


def keyed_map(mapdir, dovecot, protocol, key=r"127\.0\.0\.5"):
    """A posix_regex popmap that sends the key (and nothing else) to
    Dovecot."""
    port = dovecot.imap_port if protocol.startswith("IMAP") \
        else dovecot.pop3_port
    path = mapdir / "popmap.re"
    path.write_text("'^%s$' 127.0.0.1:%d\n" % (key, port))
    path.chmod(0o644)
    return ["-M", "posix_regex", "-m", str(path)]


def log_in(client, protocol):
    """Log in as alice and out again; return the login's answer."""
    assert client.readline().startswith(b"* OK" if protocol.startswith(
        "IMAP") else b"+OK")
    return log_in_and_out(client, protocol)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("protocol", ["IMAP4", "POP3", "IMAP4S"])
def test_behind_haproxy_the_client_address_is_the_real_one(
        dovecot, mapdir, tmp_path, perdition_factory, protocol, version):
    args = ["--proxy_protocol", "127.0.0.1", "--query_key", r"\i"]
    args += keyed_map(mapdir, dovecot, protocol)
    if protocol == "IMAP4S":
        args += ["--ssl_mode", "ssl_listen", "--ssl_cert_file",
                 dovecot.cert_file, "--ssl_key_file", dovecot.key_file]
    proxy = perdition_factory(args, protocol)
    with HAProxy(tmp_path, proxy.port, version) as balancer:
        with RawClient(balancer.port, source=(CLIENT, 0)) as client:
            if protocol == "IMAP4S":
                context = ssl.create_default_context(cafile=dovecot.cert_file)
                client.starttls(context)
            answer = log_in(client, protocol)
        assert answer.startswith(b"a OK" if protocol.startswith("IMAP")
                                 else b"+OK"), answer
        log = proxy.wait_for_log('Close: %s user="alice"' % CLIENT)
    assert "Connect: %s\n" % CLIENT in log
    assert 'Auth: %s user="alice" passwd="XXXXXX" server="127.0.0.1"' \
        % CLIENT in log


def test_every_address_escape_comes_from_the_header(
        dovecot, mapdir, perdition_factory):
    r"""\i, \p, \I and \P are the client's and the address it connected
    to, as the balancer saw them."""
    args = ["--proxy_protocol", "127.0.0.0/8", "--query_key", r"\i:\p:\I:\P"]
    args += keyed_map(mapdir, dovecot, "IMAP4",
                      r"10\.1\.2\.3:1234:10\.0\.0\.1:993")
    proxy = perdition_factory(args, "IMAP4")
    with RawClient(proxy.port) as client:
        client.send(v2_header(("10.1.2.3", 1234), ("10.0.0.1", 993)))
        assert log_in(client, "IMAP4").startswith(b"a OK")
    log = proxy.wait_for_log('Close: 10.1.2.3 user="alice"')
    assert "Connect: 10.1.2.3\n" in log


def test_header_and_first_command_in_one_segment(dovecot, perdition_factory):
    """The header is read exactly: the command right behind it is intact."""
    proxy = perdition_factory(["--proxy_protocol", "127.0.0.1"], "IMAP4",
                              dovecot.imap_port)
    with RawClient(proxy.port) as client:
        client.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n"
                    b"a LOGIN alice alicepw\r\n")
        assert client.readline().startswith(b"* OK")
        assert client.readline() == b"a OK You are so in\r\n"
    proxy.wait_for_log('Close: 192.0.2.7 user="alice"')


@pytest.mark.parametrize("header", [
    v2_header(("0.0.0.0", 0), ("0.0.0.0", 0), command=0x20),   # LOCAL
    V2 + b"\x20\x00\x00\x00",                   # LOCAL, no addresses
    V2 + b"\x21\x31" + struct.pack("!H", 216) + bytes(216),   # AF_UNIX
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n",
])
def test_health_checks_keep_the_balancers_address(
        dovecot, perdition_factory, header):
    proxy = perdition_factory(["--proxy_protocol", "127.0.0.1"], "IMAP4",
                              dovecot.imap_port)
    with RawClient(proxy.port) as client:
        client.send(header)
        assert log_in(client, "IMAP4").startswith(b"a OK")
    proxy.wait_for_log('Close: 127.0.0.1 user="alice"')


@pytest.mark.parametrize("data, reason", [
    (b"a LOGIN alice alicepw\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP4 " + b"1" * 100, "PROXY header line is too long"),
    (b"PROXY TCP4 192.0.2.1 x 1 2\r\n", "malformed PROXY header"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 70000\r\n", "malformed PROXY header"),
    (b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n", "malformed PROXY header"),
    (V2 + b"\x21\x11" + struct.pack("!H", 1000) + bytes(1000),
     "PROXY header of 1016 bytes is too long"),
    (V2 + b"\x22\x11\x00\x00", "unknown PROXY v2 command 0x22"),
    (V2 + b"\x11\x11\x00\x00", "unknown PROXY v2 command 0x11"),
    (V2 + b"\x21\x11\x00\x04" + bytes(4), "too short for its addresses"),
    (b"", "no PROXY header within 1 s"),
])
def test_a_bad_or_missing_header_closes_the_connection(
        perdition_factory, data, reason):
    proxy = perdition_factory(["--proxy_protocol", "127.0.0.1",
                               "--authentication_timeout", "1",
                               "-s", "127.0.0.1:1", "-M", ""], "IMAP4")
    with RawClient(proxy.port) as client:
        client.send(data)
        assert wait_for_eof(client, reset=True) == b""
    log = proxy.wait_for_log("PROXY protocol: 127.0.0.1: ")
    assert reason in log
    assert "Connect:" not in log


def test_an_untrusted_source_is_refused(dovecot, perdition_factory):
    proxy = perdition_factory(["--proxy_protocol", "127.0.0.9,10.0.0.0/8"],
                              "IMAP4", dovecot.imap_port)
    with RawClient(proxy.port) as client:
        client.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n")
        assert wait_for_eof(client, reset=True) == b""
    log = proxy.wait_for_log("PROXY protocol: 127.0.0.1: not a trusted "
                             "source of PROXY headers, closing")
    assert "192.0.2.7" not in log


def test_the_option_takes_networks_only(tmp_path):
    from helpers import run_perdition
    result = run_perdition(["--no_daemon", "-F", "+", "-M", "",
                            "--proxy_protocol", "10.0.0.0/8,nowhere"],
                           tmpdir=tmp_path)
    assert result.returncode == 1
    assert "option --proxy_protocol: invalid network 'nowhere'" \
        in result.stderr
