"""The light D-Bus client's wire format, checked against dbus-fast's own (de)marshaller."""

from __future__ import annotations

import io
import socket
import threading

import pytest
from dbus_fast import Message, MessageType
from dbus_fast._private.unmarshaller import Unmarshaller

from diversityd.adapters import busclient


def test_a_method_call_is_what_dbus_fast_reads() -> None:
    data = busclient._message(
        7,
        [
            (busclient.FIELD_PATH, "o", "/io/github/diversityd"),
            (busclient.FIELD_INTERFACE, "s", "io.github.diversityd.Manager1"),
            (busclient.FIELD_MEMBER, "s", "Status"),
            (busclient.FIELD_DESTINATION, "s", "io.github.diversityd"),
        ],
    )
    unmarshaller = Unmarshaller(io.BytesIO(data))
    message = unmarshaller.unmarshall()
    assert message is not None
    assert message.message_type == MessageType.METHOD_CALL
    assert message.serial == 7
    assert message.path == "/io/github/diversityd"
    assert message.interface == "io.github.diversityd.Manager1"
    assert message.member == "Status"
    assert message.destination == "io.github.diversityd"


@pytest.mark.parametrize("kind", ["return", "error"])
def test_replies_written_by_dbus_fast_are_read(kind: str) -> None:
    call = Message(destination="a.b", path="/a", interface="a.b", member="M", serial=2)
    if kind == "return":
        reply = Message.new_method_return(call, "s", ['{"ok": true}'])
    else:
        reply = Message.new_error(call, "org.freedesktop.DBus.Error.ServiceUnknown", "gone")
    reply.serial = 9
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Thread(target=right.sendall, args=(reply._marshall(False),))
        sender.start()
        message_kind, fields, body = busclient._read_message(left)
        sender.join()
    assert fields[busclient.FIELD_REPLY_SERIAL] == 2
    if kind == "return":
        assert message_kind == busclient.METHOD_RETURN
        assert body == b'{"ok": true}'
    else:
        assert message_kind == busclient.ERROR
        assert fields[busclient.FIELD_ERROR_NAME] in busclient.NO_SUCH_NAME
        assert body == b"gone"


def test_bus_addresses() -> None:
    assert busclient._socket_address("unix:path=/run/user/1/bus") == "/run/user/1/bus"
    assert busclient._socket_address("tcp:host=x;unix:abstract=foo") == "\0foo"
    with pytest.raises(OSError):
        busclient._socket_address("tcp:host=x,port=1")
