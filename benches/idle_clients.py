#!/usr/bin/env python3
"""Open N logged-in, idle PostgreSQL client connections and hold them.

Used by benches/pgbench.sh to measure a pooler's memory per idle client:

    python3 benches/idle_clients.py --port 6432 --user bench --database bench \
        --password secret -n 10000

Connections go to a loopback host (127.0.0.1 by default) from source addresses 127.0.0.2,
127.0.0.3, ... with at most --per-source connections each, so N can exceed the ephemeral port
range of one address pair. Each one speaks the protocol 3.0 startup, authenticates (trust,
cleartext password, md5 or SCRAM-SHA-256 without channel binding) and waits for ReadyForQuery;
at most --concurrency logins are in flight at a time. When all N are idle it prints
"ready N" on stdout, then holds them until stdin reaches end of file (or, with --no-stdin,
until a signal) or SIGTERM/SIGINT arrives, and closes each with a Terminate message.

A failed login is reported with the server's ErrorResponse and exits with status 1, as does a
server closing an idle connection while they are held. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import ipaddress
import os
import resource
import signal
import struct
import sys
import threading
import time

PROTOCOL_3_0 = 196608


class LoginError(Exception):
    pass


def log(msg: str) -> None:
    print(f"idle_clients: {msg}", file=sys.stderr, flush=True)


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if hard != resource.RLIM_INFINITY and want > hard:
        want = hard
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < needed + 16:
        raise SystemExit(
            f"idle_clients: open file limit {want} (hard {hard}) is too low for {needed} connections"
        )


def error_fields(payload: bytes) -> dict[str, str]:
    fields = {}
    for part in payload.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def format_error(payload: bytes) -> str:
    f = error_fields(payload)
    text = f"{f.get('S', 'ERROR')} {f.get('C', '?????')} {f.get('M', '(no message)')}"
    if "D" in f:
        text += f" (detail: {f['D']})"
    return text


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    kind = header[:1]
    (length,) = struct.unpack("!I", header[1:])
    if length < 4 or length > 1 << 24:
        raise LoginError(f"bad message length {length} for {kind!r}")
    return kind, await reader.readexactly(length - 4)


class Scram:
    """Client side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, gs2 header "n,,".

    The password is used as UTF-8 without SASLprep, which equals SASLprep for ASCII passwords.
    """

    def __init__(self, password: str):
        self.password = password.encode("utf-8")
        self.nonce = base64.b64encode(os.urandom(18)).decode("ascii")
        # PostgreSQL ignores the SCRAM user name (it uses the startup packet's user).
        self.client_first_bare = f"n=,r={self.nonce}"
        self.server_signature = b""

    def client_first(self) -> bytes:
        return ("n,," + self.client_first_bare).encode("ascii")

    def client_final(self, server_first: bytes) -> bytes:
        text = server_first.decode("ascii")
        attrs = dict(item.split("=", 1) for item in text.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self.nonce):
            raise LoginError("SCRAM server nonce does not extend the client nonce")
        salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={base64.b64encode(b'n,,').decode('ascii')},r={nonce}"
        auth_message = f"{self.client_first_bare},{text},{without_proof}".encode("ascii")
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode("ascii")

    def verify_final(self, server_final: bytes) -> None:
        attrs = dict(item.split("=", 1) for item in server_final.decode("ascii").split(","))
        if "e" in attrs:
            raise LoginError(f"SCRAM error from server: {attrs['e']}")
        if not hmac.compare_digest(base64.b64decode(attrs.get("v", "")), self.server_signature):
            raise LoginError("SCRAM server signature does not match")


async def login(args, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        args.host, args.port, local_addr=(source, 0)
    )
    try:
        params = b""
        for key, value in (
            ("user", args.user),
            ("database", args.database),
            ("application_name", args.application_name),
        ):
            params += key.encode() + b"\0" + value.encode() + b"\0"
        body = struct.pack("!I", PROTOCOL_3_0) + params + b"\0"
        writer.write(struct.pack("!I", len(body) + 4) + body)
        await writer.drain()
        scram = None
        while True:
            kind, payload = await read_message(reader)
            if kind == b"E":
                raise LoginError(format_error(payload))
            if kind == b"Z":
                return reader, writer
            if kind != b"R":
                continue  # ParameterStatus, BackendKeyData, NoticeResponse
            (code,) = struct.unpack("!I", payload[:4])
            if code == 0:  # AuthenticationOk
                continue
            if args.password is None and code in (3, 5, 10):
                raise LoginError(f"server asks for a password (auth code {code}); pass --password")
            if code == 3:  # cleartext
                writer.write(message(b"p", args.password.encode() + b"\0"))
            elif code == 5:  # md5
                salt = payload[4:8]
                inner = hashlib.md5((args.password + args.user).encode()).hexdigest()
                outer = hashlib.md5(inner.encode() + salt).hexdigest()
                writer.write(message(b"p", b"md5" + outer.encode() + b"\0"))
            elif code == 10:  # SASL
                mechanisms = [m.decode() for m in payload[4:].split(b"\0") if m]
                if "SCRAM-SHA-256" not in mechanisms:
                    raise LoginError(f"no supported SASL mechanism in {mechanisms}")
                scram = Scram(args.password)
                first = scram.client_first()
                writer.write(
                    message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first)
                )
            elif code == 11:  # SASLContinue
                if scram is None:
                    raise LoginError("SASLContinue before SASL")
                writer.write(message(b"p", scram.client_final(payload[4:])))
            elif code == 12:  # SASLFinal
                if scram is None:
                    raise LoginError("SASLFinal before SASL")
                scram.verify_final(payload[4:])
                continue
            else:
                raise LoginError(f"unsupported authentication request {code}")
            await writer.drain()
    except BaseException:
        writer.close()
        raise


def source_address(args, index: int) -> str:
    base = ipaddress.IPv4Address(args.source_base)
    return str(base + index // args.per_source)


async def close_all(conns) -> None:
    terminate = message(b"X", b"")
    for _, writer in conns:
        if writer is None:
            continue
        try:
            writer.write(terminate)
            writer.close()
        except (ConnectionError, RuntimeError):
            pass
    results = await asyncio.gather(
        *(w.wait_closed() for _, w in conns if w is not None), return_exceptions=True
    )
    del results


async def watch_idle(index: int, reader: asyncio.StreamReader, lost: asyncio.Queue) -> None:
    """Reports a held connection the server closes or writes to (it should stay silent)."""
    try:
        kind, payload = await read_message(reader)
        if kind == b"E":
            why = format_error(payload)
        elif kind == b"N":
            return  # a notice is harmless
        else:
            why = f"unexpected message {kind!r}"
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        why = f"connection closed ({exc.__class__.__name__})"
    except asyncio.CancelledError:
        return
    except LoginError as exc:
        why = str(exc)
    await lost.put(f"connection #{index} while idle: {why}")


async def main_async(args) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not args.no_stdin:
        def wait_stdin() -> None:
            # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader
            # aborts the interpreter at exit.
            try:
                while os.read(0, 65536):
                    pass
            except OSError:
                pass
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_stdin, daemon=True).start()

    conns: list = [(None, None)] * args.count
    next_index = 0
    failures: list[str] = []
    started = time.monotonic()
    done = 0

    async def worker() -> None:
        nonlocal next_index, done
        while next_index < args.count and not failures and not stop.is_set():
            index = next_index
            next_index += 1
            source = source_address(args, index)
            try:
                conns[index] = await asyncio.wait_for(login(args, source), args.timeout)
            except LoginError as exc:
                failures.append(f"connection #{index} from {source}: {exc}")
                return
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                what = "timed out" if isinstance(exc, asyncio.TimeoutError) else repr(exc)
                failures.append(f"connection #{index} from {source}: {what}")
                return
            done += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(5)
            log(f"{done}/{args.count} logged in after {time.monotonic() - started:.0f}s")

    reporter = asyncio.create_task(progress())
    await asyncio.gather(*(worker() for _ in range(min(args.concurrency, args.count))))
    reporter.cancel()
    if failures or done < args.count:
        for line in failures[:5]:
            log(f"login failed: {line}")
        if not failures:
            log(f"interrupted after {done}/{args.count} logins")
        await close_all(conns)
        return 1

    elapsed = time.monotonic() - started
    log(f"{args.count} connections logged in in {elapsed:.1f}s ({args.count / elapsed:.0f}/s)")
    lost: asyncio.Queue = asyncio.Queue()
    watchers = [
        asyncio.create_task(watch_idle(i, r, lost)) for i, (r, _) in enumerate(conns)
    ]
    print(f"ready {args.count}", flush=True)

    stopper = asyncio.create_task(stop.wait())
    loser = asyncio.create_task(lost.get())
    await asyncio.wait({stopper, loser}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if loser.done():
        status = 1
        log(loser.result())
        await asyncio.sleep(0.5)  # let the other losses of the same event arrive
        more = [lost.get_nowait() for _ in range(lost.qsize())]
        for line in more[:4]:
            log(line)
        if len(more) > 4:
            log(f"... and {len(more) - 4} more connections lost")
    else:
        loser.cancel()
    stopper.cancel()
    for task in watchers:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    await close_all(conns)
    log(f"closed {args.count} connections")
    return status


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--count", type=int, required=True, help="connections to open")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to connect to")
    p.add_argument("-p", "--port", type=int, required=True)
    p.add_argument("-U", "--user", default="postgres")
    p.add_argument("-d", "--database", default=None, help="default: the user name")
    p.add_argument("--password", default=os.environ.get("PGPASSWORD") or None,
                   help="password for cleartext/md5/SCRAM (default: $PGPASSWORD)")
    p.add_argument("--application-name", default="idle_clients")
    p.add_argument("--source-base", default="127.0.0.2",
                   help="first source address; later ones follow it (default 127.0.0.2)")
    p.add_argument("--per-source", type=int, default=20000,
                   help="connections per source address (default 20000)")
    p.add_argument("--concurrency", type=int, default=200, help="logins in flight (default 200)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per login (default 60)")
    p.add_argument("--no-stdin", action="store_true",
                   help="hold until SIGTERM/SIGINT only, not until stdin closes")
    args = p.parse_args(argv)
    args.database = args.database or args.user
    if args.count < 1 or args.per_source < 1 or args.concurrency < 1:
        p.error("--count, --per-source and --concurrency must be positive")
    for name in ("host", "source_base"):
        addr = ipaddress.ip_address(getattr(args, name))
        if not addr.is_loopback or addr.version != 4:
            p.error(f"--{name.replace('_', '-')} must be an IPv4 loopback address")
    last = ipaddress.IPv4Address(args.source_base) + (args.count - 1) // args.per_source
    if not last.is_loopback:
        p.error(f"{args.count} connections need source addresses up to {last}, past 127/8")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    raise_nofile(args.count)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
