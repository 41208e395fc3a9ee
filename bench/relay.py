"""A bare relay: the floor for any proxy built of threads in CPython.

Two threads per connection copy bytes with recv() and sendall(), and do
nothing else: no protocol, no login, no log, no limits.  Measured beside
perdition (``--other-proxy``, see README.md), it shows how much of
perdition's cost is its own and how much is the price, on this machine, of
a thread wake-up and of the GIL.  It is not a proxy to deploy: it has no
timeouts and it passes TLS through untouched.

    python3 bench/relay.py LISTEN_PORT BACKEND_PORT

It listens on 127.0.0.1 and runs until it is signalled.
"""

import socket
import sys
import threading

BUFFER_SIZE = 65536


def pump(source, destination):
    """Copy one direction until either side ends, then end both."""
    try:
        while data := source.recv(BUFFER_SIZE):
            destination.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, destination):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def session(client, backend_port):
    with client:
        try:
            server = socket.create_connection(("127.0.0.1", backend_port),
                                              timeout=10)
        except OSError:
            return
        with server:
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            other = threading.Thread(target=pump, args=(server, client),
                                     daemon=True)
            other.start()
            pump(client, server)
            other.join()


def main(listen_port, backend_port):
    threading.stack_size(256 * 1024)
    listener = socket.create_server(("127.0.0.1", listen_port),
                                    backlog=socket.SOMAXCONN)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=session, args=(client, backend_port),
                         daemon=True).start()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: relay.py LISTEN_PORT BACKEND_PORT")
    main(int(sys.argv[1]), int(sys.argv[2]))
