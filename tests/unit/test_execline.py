"""ExecStart= as systemd reads it (issue 20, point 6). The cases are systemd's own: its
test-load-fragment.c (test_config_parse_exec) and the escapes of systemd.syntax(7), each
checked against systemd 252's `ExecStartEx` on this machine's kind
(tests/integration/test_unit_corpus.py compares the corpus likewise, live)."""

from __future__ import annotations

import pytest

from diversityd.execline import (
    AMBIENT,
    IGNORE_FAILURE,
    NO_ENV_EXPAND,
    NO_SETUID,
    PRIVILEGED,
    ExecCommand,
    ExecLineError,
    parse_exec,
    split_words,
)

SPECIFIERS = {"h": "/home/miko", "u": "miko"}


def one(line: str) -> ExecCommand:
    (command,) = parse_exec(line, SPECIFIERS)
    return command


@pytest.mark.parametrize(
    ("line", "path", "argv", "flags"),
    [
        # the two: a `-` kept in the path, `\x20` read as `x20`
        (
            "@-/usr/bin/llama-server llama-server -m /m/my\\x20model.gguf",
            "/usr/bin/llama-server",
            ("llama-server", "-m", "/m/my model.gguf"),
            {IGNORE_FAILURE},
        ),
        # systemd's test_config_parse_exec
        ("/RValue r1", "/RValue", ("/RValue", "r1"), set()),
        ("/RValue///slashes r1///", "/RValue/slashes", ("/RValue///slashes", "r1///"), set()),
        (
            "@/RValue///slashes2 ///argv0 r1",
            "/RValue/slashes2",
            ("///argv0", "r1"),
            set(),
        ),
        ("-@/RValue///slashes3 argv0a r1", "/RValue/slashes3", ("argv0a", "r1"), {IGNORE_FAILURE}),
        ("@-/RValue///slashes4 argv0b r1", "/RValue/slashes4", ("argv0b", "r1"), {IGNORE_FAILURE}),
        ("-@/RValue argv0 r1 ';'", "/RValue", ("argv0", "r1", ";"), {IGNORE_FAILURE}),
        ("/bin/find \\;", "/bin/find", ("/bin/find", ";"), set()),
        ("/sbin/find \\; /x", "/sbin/find", ("/sbin/find", ";", "/x"), set()),
        ("/sbin/find \\;x", "/sbin/find", ("/sbin/find", "\\;x"), set()),
        ("/bin/find \\073", "/bin/find", ("/bin/find", ";"), set()),
        ('/bin/find ";"', "/bin/find", ("/bin/find", ";"), set()),
        ('/sbin/find ";" /x', "/sbin/find", ("/sbin/find", ";", "/x"), set()),
        (
            '"/PATH WITH SPACES/daemon" -1 -2',
            "/PATH WITH SPACES/daemon",
            ("/PATH WITH SPACES/daemon", "-1", "-2"),
            set(),
        ),
        (
            '"/PATH WITH SPACES/daemon -1 -2"',
            "/PATH WITH SPACES/daemon -1 -2",
            ("/PATH WITH SPACES/daemon -1 -2",),
            set(),
        ),
        (
            '"/PATH WITH SPACES/daemon" "-1" \'-2\'',
            "/PATH WITH SPACES/daemon",
            ("/PATH WITH SPACES/daemon", "-1", "-2"),
            set(),
        ),
        (
            "\"/PATH\\sWITH\\sSPACES/daemon\" '-1 -2'",
            "/PATH WITH SPACES/daemon",
            ("/PATH WITH SPACES/daemon", "-1 -2"),
            set(),
        ),
        (
            '"/PATH\\x20WITH\\x20SPACES/daemon" "-1 -2"',
            "/PATH WITH SPACES/daemon",
            ("/PATH WITH SPACES/daemon", "-1 -2"),
            set(),
        ),
        ("/path\\s", "/path ", ("/path ",), set()),
        ("/bin/grep '\\w+\\K'", "/bin/grep", ("/bin/grep", "\\w+\\K"), set()),
        # the prefixes (ExecStartEx's flags), quotes anywhere, escapes, specifiers
        ("!!/bin/x y", "/bin/x", ("/bin/x", "y"), {AMBIENT}),
        ("!/bin/x y", "/bin/x", ("/bin/x", "y"), {NO_SETUID}),
        (":+/bin/x $A ${B}", "/bin/x", ("/bin/x", "$A", "${B}"), {PRIVILEGED, NO_ENV_EXPAND}),
        ('/bin/x a"b c"d', "/bin/x", ("/bin/x", "ab cd"), set()),
        (
            "/bin/x 'a\\x20b' \"c\\sd\" e\\qf g\\x4",
            "/bin/x",
            ("/bin/x", "a b", "c d", "e\\qf", "g\\x4"),
            set(),
        ),
        ("/bin/x \\u00e9 \\303\\251", "/bin/x", ("/bin/x", "é", "é"), set()),
        ("/bin/x %%h %h", "/bin/x", ("/bin/x", "%h", "/home/miko"), set()),
        ("/a/../b/./c x", "/a/../b/c", ("/a/../b/./c", "x"), set()),
        ("env A=1 /bin/true", "env", ("env", "A=1", "/bin/true"), set()),
    ],
)
def test_as_systemd_reads_it(line: str, path: str, argv: tuple[str, ...], flags: set[str]) -> None:
    command = one(line)
    assert (command.path, command.argv, set(command.flags)) == (path, argv, flags)


def test_commands_around_semicolons() -> None:
    commands = parse_exec("-@/RValue argv0 r1 ; ; /goo/goo boo", SPECIFIERS)
    assert [(c.path, c.argv) for c in commands] == [
        ("/RValue", ("argv0", "r1")),
        ("/goo/goo", ("/goo/goo", "boo")),
    ]
    assert [c.path for c in parse_exec("-@/RValue argv0 r1 ; ", SPECIFIERS)] == ["/RValue"]
    assert [c.path for c in parse_exec("-@/RValue argv0 r1 ;", SPECIFIERS)] == ["/RValue"]


@pytest.mark.parametrize(
    "line",
    [
        "/RValue/ argv0 r1",  # a directory
        "@/RValue",  # `@` with no argv[0]
        "/path 'foo",  # missing ending '
        "/path 'foo\\",  # missing ending ' with a trailing backslash
        *(f"/path\\{c}" for c in "abfnrtv\\'\"x"),  # an unsafe or incomplete path
    ],
)
def test_what_systemd_refuses(line: str) -> None:
    with pytest.raises(ExecLineError):
        parse_exec(line, SPECIFIERS)


@pytest.mark.parametrize("line", ["--/RValue argv0 r1", "-@-/RValue argv0 r1", "- /path", "-"])
def test_an_ignorable_command_systemd_refuses_is_dropped(line: str) -> None:
    assert parse_exec(line, SPECIFIERS) == []


def test_environment_words_split_as_systemd_splits_them() -> None:
    assert split_words('A=1 "B=two words" C=my\\x20model \'D=x"y\'') == [
        "A=1",
        "B=two words",
        "C=my model",
        'D=x"y',
    ]
