"""`ExecStart=` (and `Environment=`) as systemd reads them. Pure.

What install reads when systemd cannot tell it (a system unit, no user bus, a unit not
loaded): the words split as systemd's `extract_first_word` does with its UNQUOTE and
CUNESCAPE flags (quotes anywhere in a word, single or double, escapes inside both; C
escapes `\\n`, `\\s` (a space), `\\x20`, `\\073`, `\\u00e9`, `\\U0001F600`, producing bytes
that are then read as UTF-8; an escape systemd does not know is kept as written, as
systemd keeps it after a warning), then the command line as `config_parse_exec` builds it
(systemd 252): the prefixes `@-:+!` (and `!!`) on the first word, `@`'s second word as
argv[0], a lone `;` between commands and `\\;` for a literal one, specifiers (`%h`, `%%`,
...) resolved after unquoting, the path's slashes simplified. `$VAR` is left for
`foreignunits.expand_variables`: systemd expands it at exec time, unless the `:` prefix
says not to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

WHITESPACE = " \t\n\r"
# ExecStartEx's names for the prefixes (systemd's exec_command_flags_to_strv)
IGNORE_FAILURE = "ignore-failure"  # -
NO_ENV_EXPAND = "no-env-expand"  # :
PRIVILEGED = "privileged"  # +
NO_SETUID = "no-setuid"  # !
AMBIENT = "ambient"  # !!
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}
_HEX = "0123456789abcdefABCDEF"
_OCTAL = "01234567"


class ExecLineError(ValueError):
    """systemd would refuse this line (unbalanced quotes, a trailing backslash, no path)."""


@dataclass(frozen=True)
class ExecCommand:
    """One command of an `ExecStart=` line, as systemd keeps it (its D-Bus `ExecStartEx`):
    the program, argv (argv[0] included) and the prefixes' flags."""

    path: str
    argv: tuple[str, ...]
    flags: frozenset[str] = frozenset()

    @property
    def arguments(self) -> tuple[str, ...]:
        """What follows argv[0]."""
        return self.argv[1:]


def _unescape_one(text: str, at: int) -> tuple[bytes, int] | None:
    """The escape after a backslash at `text[at]`: (its bytes, characters used), or None
    when systemd does not know it (cunescape_one)."""
    char = text[at] if at < len(text) else ""
    if char in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[char].encode(), 1
    if char == "x":
        digits = text[at + 1 : at + 3]
        if len(digits) == 2 and all(d in _HEX for d in digits) and digits != "00":
            return bytes([int(digits, 16)]), 3
        return None
    if char in ("u", "U"):
        size = 4 if char == "u" else 8
        digits = text[at + 1 : at + 1 + size]
        if len(digits) != size or not all(d in _HEX for d in digits):
            return None
        code = int(digits, 16)
        if code == 0 or code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            return None
        return chr(code).encode(), 1 + size
    if char and char in _OCTAL:
        digits = text[at : at + 3]
        if len(digits) != 3 or not all(d in _OCTAL for d in digits):
            return None
        code = int(digits, 8)
        if code == 0 or code > 255:
            return None
        return bytes([code]), 3
    return None


def next_word(text: str, at: int) -> tuple[str | None, int]:
    """The word starting at or after `text[at]`, unquoted and unescaped, and where the
    next one may start; (None, len(text)) when only whitespace is left."""
    while at < len(text) and text[at] in WHITESPACE:
        at += 1
    if at >= len(text):
        return None, len(text)
    out = bytearray()
    quote = ""
    while at < len(text):
        char = text[at]
        if char == "\\":
            if at + 1 >= len(text):
                if quote:
                    raise ExecLineError(f"an unbalanced {quote}")
                out += b"\\"  # kept, as systemd keeps it after a warning
                at += 1
                continue
            escaped = _unescape_one(text, at + 1)
            if escaped is None:  # kept verbatim (systemd warns: unknown escape)
                out += text[at : at + 2].encode()
                at += 2
            else:
                out += escaped[0]
                at += 1 + escaped[1]
        elif quote:
            if char == quote:
                quote = ""
            else:
                out += char.encode()
            at += 1
        elif char in "'\"":
            quote = char
            at += 1
        elif char in WHITESPACE:
            break
        else:
            out += char.encode()
            at += 1
    if quote:
        raise ExecLineError(f"an unbalanced {quote}")
    return out.decode("utf-8", errors="surrogateescape"), at


def split_words(text: str) -> list[str]:
    """Every word of a setting (Environment=, ...), as systemd splits it."""
    words: list[str] = []
    at = 0
    while True:
        word, at = next_word(text, at)
        if word is None:
            return words
        words.append(word)


def expand_specifiers(word: str, specifiers: Mapping[str, str]) -> str:
    """systemd's `%h`, `%u`, `%E`, ... (those given), `%%` -> `%`; unknown ones are kept."""
    out = []
    at = 0
    while at < len(word):
        if word[at] == "%" and at + 1 < len(word):
            code = word[at + 1]
            out.append("%" if code == "%" else specifiers.get(code, "%" + code))
            at += 2
        else:
            out.append(word[at])
            at += 1
    return "".join(out)


def _prefixes(word: str) -> tuple[frozenset[str], bool, str]:
    """(flags, `@`, the rest) of a command's first word."""
    flags: set[str] = set()
    argv0 = False
    at = 0
    privilege = {PRIVILEGED, NO_SETUID, AMBIENT}
    while at < len(word):
        char = word[at]
        if char == "-" and IGNORE_FAILURE not in flags:
            flags.add(IGNORE_FAILURE)
        elif char == "@" and not argv0:
            argv0 = True
        elif char == ":" and NO_ENV_EXPAND not in flags:
            flags.add(NO_ENV_EXPAND)
        elif char == "+" and not flags & privilege:
            flags.add(PRIVILEGED)
        elif char == "!" and not flags & privilege:
            flags.add(NO_SETUID)
        elif char == "!" and not flags & {PRIVILEGED, AMBIENT}:
            flags.discard(NO_SETUID)
            flags.add(AMBIENT)
        else:
            break
        at += 1
    return frozenset(flags), argv0, word[at:]


def _lone(text: str, at: int, token: str) -> bool:
    """`token` at `text[at]`, followed by whitespace or the end."""
    end = at + len(token)
    return text.startswith(token, at) and (end >= len(text) or text[end] in WHITESPACE)


def parse_exec(value: str, specifiers: Mapping[str, str]) -> list[ExecCommand]:
    """The commands of one `ExecStart=` value (several only around a lone `;`). Raises
    ExecLineError where systemd would refuse the line; a command whose `-` says to
    ignore its failure and that systemd would refuse is dropped, as systemd drops it."""
    commands: list[ExecCommand] = []
    at = 0
    while True:
        while at < len(value) and value[at] in WHITESPACE:
            at += 1
        if _lone(value, at, ";"):  # an empty command between two: none
            at += 1
            continue
        first, at = next_word(value, at)
        if first is None:
            return commands
        flags, argv0, rest = _prefixes(first)
        path = expand_specifiers(rest, specifiers)
        words: list[str] = []
        separated = False
        while True:
            while at < len(value) and value[at] in WHITESPACE:
                at += 1
            if at >= len(value):
                break
            if _lone(value, at, ";"):
                at += 1
                separated = True
                break
            if _lone(value, at, "\\;"):
                words.append(";")
                at += 2
                continue
            word, at = next_word(value, at)
            if word is None:
                break
            words.append(expand_specifiers(word, specifiers))
        argv = words if argv0 else [path, *words]
        problem = _refused(path, argv)
        if problem is None:
            commands.append(ExecCommand(simplify_path(path), tuple(argv), flags))
        elif IGNORE_FAILURE not in flags:
            raise ExecLineError(problem)
        if not separated:
            return commands


def simplify_path(path: str) -> str:
    """systemd's path_simplify: no empty or `.` components (`..` stays)."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    simplified = "/".join(parts)
    return "/" + simplified if path.startswith("/") else simplified or path


def _refused(path: str, argv: list[str]) -> str | None:
    if not path:
        return "no program in the command line"
    if path.endswith("/"):
        return f"the program {path!r} names a directory"
    if any(ord(c) < 32 or c in "\\\"'" or ord(c) == 127 for c in path):
        return f"the program {path!r} holds special characters"
    if not path.startswith("/") and "/" in path:
        return f"{path!r} is neither an absolute path nor a program's name"
    if not argv or not argv[0]:
        return "no argv[0] after `@`"
    return None
