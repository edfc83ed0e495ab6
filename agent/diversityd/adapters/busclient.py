"""A minimal blocking D-Bus client for one method call that returns a string.

`diversityctl status` is run by people and scripts many times a minute; importing asyncio
and dbus-fast costs it ~80 ms before a single byte is sent. This speaks just enough of the
protocol (EXTERNAL auth, Hello, one METHOD_CALL, its METHOD_RETURN or ERROR) with the
standard library. Everything else (signals, jobs) uses dbus-fast.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence

# diversityd's own names on the user bus (adapters/control.py serves them).
BUS_NAME = "io.github.diversityd"
OBJECT_PATH = "/io/github/diversityd"
INTERFACE = "io.github.diversityd.Manager1"
NO_SUCH_NAME = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)

METHOD_CALL, METHOD_RETURN, ERROR = 1, 2, 3
FIELD_PATH, FIELD_INTERFACE, FIELD_MEMBER, FIELD_ERROR_NAME = 1, 2, 3, 4
FIELD_REPLY_SERIAL, FIELD_DESTINATION, FIELD_SIGNATURE = 5, 6, 8


class BusCallError(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def session_bus_address() -> str:
    address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if address:
        return address
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"unix:path={runtime}/bus"


def _socket_address(address: str) -> str:
    for part in address.split(";"):
        kind, _, params = part.partition(":")
        if kind != "unix":
            continue
        values = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if "path" in values:
            return values["path"]
        if "abstract" in values:
            return "\0" + values["abstract"]
    raise OSError(f"no unix socket in the bus address {address!r}")


def _pad(data: bytearray, boundary: int) -> None:
    data.extend(b"\0" * (-len(data) % boundary))


def _string(data: bytearray, value: str, length_bytes: int = 4) -> None:
    encoded = value.encode()
    if length_bytes == 4:
        _pad(data, 4)
        data.extend(struct.pack("<I", len(encoded)))
    else:  # a signature: one length byte
        data.append(len(encoded))
    data.extend(encoded + b"\0")


def _message(serial: int, fields: Sequence[tuple[int, str, str]], body: bytes = b"") -> bytes:
    """A little-endian METHOD_CALL with the given (code, signature, value) header fields."""
    header = bytearray(b"l" + bytes([METHOD_CALL, 0, 1]))
    header.extend(struct.pack("<II", len(body), serial))
    array = bytearray()
    offset = len(header) + 4  # the array's contents start after its length
    for code, signature, value in fields:
        # struct alignment is 8, counted from the start of the message
        array.extend(b"\0" * (-(offset + len(array)) % 8))
        array.append(code)
        array.extend(bytes([len(signature)]) + signature.encode() + b"\0")
        inner = bytearray(b"\0" * (offset + len(array)))
        mark = len(inner)
        _string(inner, value, 1 if signature == "g" else 4)
        array.extend(inner[mark:])
    header.extend(struct.pack("<I", len(array)))
    header.extend(array)
    _pad(header, 8)
    return bytes(header) + body


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        chunk = sock.recv(count - len(chunks))
        if not chunk:
            raise OSError("the bus closed the connection")
        chunks.extend(chunk)
    return bytes(chunks)


def _read_message(sock: socket.socket) -> tuple[int, dict[int, object], bytes]:
    fixed = _read_exactly(sock, 16)
    endian = "<" if fixed[0:1] == b"l" else ">"
    kind = fixed[1]
    body_length, _serial, fields_length = struct.unpack(endian + "III", fixed[4:16])
    rest = _read_exactly(sock, fields_length + (-(16 + fields_length) % 8) + body_length)
    fields: dict[int, object] = {}
    position = 16
    data = fixed + rest
    end = 16 + fields_length
    while position < end:
        position += -position % 8
        code = data[position]
        signature_length = data[position + 1]
        signature = data[position + 2 : position + 2 + signature_length].decode()
        position += 3 + signature_length
        if signature in ("s", "o"):
            position += -position % 4
            (length,) = struct.unpack(endian + "I", data[position : position + 4])
            fields[code] = data[position + 4 : position + 4 + length].decode()
            position += 5 + length
        elif signature == "g":
            length = data[position]
            fields[code] = data[position + 1 : position + 1 + length].decode()
            position += 2 + length
        elif signature == "u":
            position += -position % 4
            (fields[code],) = struct.unpack(endian + "I", data[position : position + 4])
            position += 4
        else:
            raise OSError(f"unexpected header field type {signature!r}")
    body = data[end + (-end % 8) :]
    body_signature = fields.get(FIELD_SIGNATURE)
    if isinstance(body_signature, str) and body_signature.startswith("s") and body:
        (length,) = struct.unpack(endian + "I", body[:4])
        body = body[4 : 4 + length]
    return kind, fields, body


def call_string(
    address: str, destination: str, path: str, interface: str, member: str, *, timeout_s: float
) -> str:
    """Call a method without arguments that returns one string; raise BusCallError with
    the D-Bus error name when it fails."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(_socket_address(address))
        uid = str(os.getuid()).encode().hex()
        sock.sendall(b"\0AUTH EXTERNAL " + uid.encode() + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(256)
            if not chunk:
                raise OSError("the bus closed the connection during authentication")
            reply += chunk
        if not reply.startswith(b"OK "):
            raise OSError(f"the bus refused authentication: {reply.strip().decode()}")
        sock.sendall(b"BEGIN\r\n")
        sock.sendall(
            _message(
                1,
                [
                    (FIELD_PATH, "o", "/org/freedesktop/DBus"),
                    (FIELD_INTERFACE, "s", "org.freedesktop.DBus"),
                    (FIELD_MEMBER, "s", "Hello"),
                    (FIELD_DESTINATION, "s", "org.freedesktop.DBus"),
                ],
            )
        )
        sock.sendall(
            _message(
                2,
                [
                    (FIELD_PATH, "o", path),
                    (FIELD_INTERFACE, "s", interface),
                    (FIELD_MEMBER, "s", member),
                    (FIELD_DESTINATION, "s", destination),
                ],
            )
        )
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            kind, fields, body = _read_message(sock)
            if fields.get(FIELD_REPLY_SERIAL) != 2:
                continue  # Hello's reply, NameAcquired, ...
            if kind == ERROR:
                raise BusCallError(
                    str(fields.get(FIELD_ERROR_NAME, "")), body.decode(errors="replace")
                )
            if kind == METHOD_RETURN:
                return body.decode()
