"""A bare relay: the floor for any proxy built of threads in CPython.

Two threads per connection copy bytes with recv() and sendall(), and do
nothing else: no protocol, no login, no log, no limits.  Measured beside
perdition (``--other-proxy``, see README.md), it shows how much of
perdition's cost is its own and how much is the price, on this machine, of
a thread wake-up and of the GIL.  With ``--loop`` one thread relays every
connection from a selector instead: the floor of the other shape.  It is
not a proxy to deploy: it has no timeouts, a slow reader stalls the loop,
and it passes TLS through untouched.

    python3 bench/relay.py [--loop] LISTEN_PORT BACKEND_PORT

It listens on 127.0.0.1 and runs until it is signalled.
"""

import selectors
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


def connect(client, backend_port):
    """The back-end connection for *client*, or None (and *client*
    closed) when it cannot be made; both sockets block, without Nagle."""
    try:
        server = socket.create_connection(("127.0.0.1", backend_port),
                                          timeout=10)
    except OSError:
        client.close()
        return None
    for sock in (client, server):
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server


def session(client, backend_port):
    server = connect(client, backend_port)
    if server is None:
        return
    with client, server:
        other = threading.Thread(target=pump, args=(server, client),
                                 daemon=True)
        other.start()
        pump(client, server)
        other.join()


def threads(listener, backend_port):
    threading.stack_size(256 * 1024)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=session, args=(client, backend_port),
                         daemon=True).start()


def loop(listener, backend_port):
    """Every connection in one thread: a selector says which socket has
    data, and the data goes out with a blocking sendall()."""
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                client, _ = listener.accept()
                server = connect(client, backend_port)
                if server is not None:
                    selector.register(client, selectors.EVENT_READ, server)
                    selector.register(server, selectors.EVENT_READ, client)
                continue
            source, destination = key.fileobj, key.data
            try:
                data = source.recv(BUFFER_SIZE)
                if data:
                    destination.sendall(data)
                    continue
            except OSError:
                pass
            for sock in (source, destination):
                if sock.fileno() >= 0:      # not closed earlier in this turn
                    selector.unregister(sock)
                    sock.close()


def main(argv):
    shape = threads
    if argv[:1] == ["--loop"]:
        shape, argv = loop, argv[1:]
    if len(argv) != 2:
        sys.exit("usage: relay.py [--loop] LISTEN_PORT BACKEND_PORT")
    listener = socket.create_server(("127.0.0.1", int(argv[0])),
                                    backlog=socket.SOMAXCONN)
    shape(listener, int(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
