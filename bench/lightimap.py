"""A light scripted IMAP server: the back-end for the idle benchmark.

Dovecot spends an ``imap`` process on every logged-in session, so thousands
of idle sessions would measure Dovecot rather than the proxy in front of it.
This server holds them all in one asyncio process.  It answers only what a
proxy and the benchmark say: the greeting, CAPABILITY, ID, LOGIN (any
credentials, quoted strings or literals), NOOP and LOGOUT; anything else gets
BAD.

Run as ``python3 lightimap.py``: it binds a free loopback port, prints the
port number on a line of its own, and serves until its standard input is
closed (so it cannot outlive the benchmark that started it) or it is
signalled.
"""

import asyncio
import re
import resource
import sys

LITERAL = re.compile(rb"\{(\d+)(\+?)\}\r?\n\Z")
CAPABILITY = b"IMAP4rev1 LITERAL+ ID"

REPLIES = {
    b"CAPABILITY": b"* CAPABILITY " + CAPABILITY + b"\r\n%s OK CAPABILITY completed\r\n",
    b"ID": b"* ID NIL\r\n%s OK ID completed\r\n",
    b"LOGIN": b"%s OK LOGIN completed\r\n",
    b"NOOP": b"%s OK NOOP completed\r\n",
    b"LOGOUT": b"* BYE logging out\r\n%s OK LOGOUT completed\r\n",
}


async def read_command(reader, writer):
    """Read one command line, with any literals it carries; b"" at EOF."""
    line = await reader.readline()
    while (m := LITERAL.search(line)):
        if not m.group(2):
            writer.write(b"+ go ahead\r\n")
        line += await reader.readexactly(int(m.group(1)))
        line += await reader.readline()
    return line


async def session(reader, writer):
    writer.write(b"* OK [CAPABILITY " + CAPABILITY + b"] lightimap ready\r\n")
    try:
        while (line := await read_command(reader, writer)):
            words = line.split(None, 2)
            tag = words[0] if words else b"*"
            command = words[1].upper() if len(words) > 1 else b""
            reply = REPLIES.get(command, b"%s BAD unknown command\r\n")
            writer.write(reply % tag)
            await writer.drain()
            if command == b"LOGOUT":
                break
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main():
    # One descriptor per session: take all that the hard limit allows.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = await asyncio.start_server(session, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    # Serve until the parent closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
