"""A private HAProxy in TCP mode, in front of perdition, for the tests.

It runs in the foreground (``haproxy -db``) as our own child process, with a
configuration file in a temporary directory, listening on a free loopback
port and passing each connection to one server with ``send-proxy`` (PROXY
protocol version 1) or ``send-proxy-v2``.  Every wait here is bounded.
"""

import os
import shutil
import socket
import subprocess
import time

from dovecot import free_port

__all__ = ["HAProxy", "haproxy_binary"]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

CONFIG = """\
global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend perdition
    bind 127.0.0.1:{port}
    default_backend perdition
backend perdition
    server perdition 127.0.0.1:{server_port} {send_proxy}
"""


def haproxy_binary():
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin"])
    return shutil.which("haproxy", path=path)


class HAProxy:
    """HAProxy on `port`, sending every connection to *server_port* with a
    PROXY header of *version* 1 or 2."""

    def __init__(self, tmpdir, server_port, version=1):
        self.tmpdir = os.fspath(tmpdir)
        self.port = free_port()
        self.config_file = os.path.join(self.tmpdir, "haproxy-%d.cfg"
                                        % self.port)
        with open(self.config_file, "w") as f:
            f.write(CONFIG.format(port=self.port, server_port=server_port,
                                  send_proxy="send-proxy-v2" if version == 2
                                  else "send-proxy"))
        self.log_file = self.config_file[:-4] + ".log"
        self.proc = None

    def start(self):
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                [haproxy_binary(), "-db", "-f", self.config_file],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("haproxy exited with status %d:\n%s" % (
                    self.proc.returncode, open(self.log_file).read()))
            with socket.socket() as probe:
                probe.settimeout(1)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("haproxy did not listen in time")
            time.sleep(0.02)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
