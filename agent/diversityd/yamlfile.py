"""YAML with positions: every key and list item keeps the line and column it came from.

Parsing is pure (text in, values and positions out) so the configuration core can point
at `providers.yaml:12:5` without touching the file system itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from diversityd.errors import ConfigError, Finding, Severity

KeyPath = tuple[str | int, ...]

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

# A configuration is a few hundred values. Aliases can make a small file expand without
# bound (`a: &a [x, x]`, `b: &b [*a, *a]`, ...: a "billion laughs" takes minutes and all
# memory); both limits answer at once instead.
MAX_BYTES = 1 << 20
MAX_VALUES = 100_000
# A configuration nests five or six levels deep. PyYAML composes (and we convert) nodes
# recursively: 100,000 nested `[` ran out of Python's stack (RecursionError).
MAX_DEPTH = 64


class _TooBigError(Exception):
    pass


class _TooDeepError(Exception):
    def __init__(self, mark: yaml.Mark | None) -> None:
        super().__init__("nested too deep")
        self.mark = mark


class _NotScalarKeyError(_TooDeepError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses to compose nodes nested deeper than MAX_DEPTH."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeepError(event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def format_key_path(path: KeyPath) -> str:
    """`("fallback_chains", "llama3.1:latest", "chain", 0)`
    -> `fallback_chains."llama3.1:latest".chain[0]`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        name = part if _PLAIN_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
        text += f".{name}" if text else name
    return text


@dataclass(frozen=True)
class LoadedYaml:
    """A parsed document and the 1-based (line, column) of every key and item in it."""

    file: str
    data: Any
    positions: dict[KeyPath, tuple[int, int]] = field(default_factory=dict)

    def position(self, path: KeyPath) -> tuple[int | None, int | None]:
        # Fall back to the nearest enclosing key: a missing key is reported at its parent.
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return (None, None)

    def finding(
        self,
        severity: Severity,
        code: str,
        path: KeyPath,
        message: str,
        hint: str | None = None,
    ) -> Finding:
        line, column = self.position(path)
        return Finding(
            severity=severity,
            code=code,
            message=message,
            file=self.file,
            key_path=format_key_path(path) or None,
            line=line,
            column=column,
            hint=hint,
        )


def _too_big(file: str, message: str) -> ConfigError:
    return ConfigError(
        [
            Finding(
                severity=Severity.ERROR,
                code="yaml-too-big",
                message=message,
                file=file,
                hint="a configuration is a few hundred values: remove the aliases (&name, "
                "*name) that repeat one another, or split the file",
            )
        ]
    )


def parse_yaml(text: str, file: str) -> LoadedYaml:
    """Parse one YAML document; raises ConfigError (with line and column) when malformed,
    and at once when it is, or expands to, far more than a configuration holds."""
    if len(text) > MAX_BYTES:
        raise _too_big(file, f"the file holds {len(text):,} characters (at most {MAX_BYTES:,})")
    loader = _BoundedLoader(text)
    positions: dict[KeyPath, tuple[int, int]] = {}
    duplicates: list[Finding] = []
    budget = [MAX_VALUES]
    try:
        node = loader.get_single_node()
        data = (
            None
            if node is None
            else _convert(
                loader,
                node,
                path=(),
                positions=positions,
                duplicates=duplicates,
                file=file,
                budget=budget,
            )
        )
    except _TooBigError:
        raise _too_big(
            file, f"its aliases expand to more than {MAX_VALUES:,} values (an alias bomb?)"
        ) from None
    except _NotScalarKeyError as exc:
        raise ConfigError(
            [
                Finding(
                    severity=Severity.ERROR,
                    code="yaml-syntax",
                    message="a key that is a list or a mapping",
                    file=file,
                    line=exc.mark.line + 1 if exc.mark else None,
                    column=exc.mark.column + 1 if exc.mark else None,
                    hint="keys are names: write `name: value`",
                )
            ]
        ) from None
    except (_TooDeepError, RecursionError) as exc:
        mark = exc.mark if isinstance(exc, _TooDeepError) else None
        raise ConfigError(
            [
                Finding(
                    severity=Severity.ERROR,
                    code="yaml-too-deep",
                    message=f"values nested more than {MAX_DEPTH} levels deep",
                    file=file,
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                    hint="a configuration nests a few levels: look for unclosed brackets, "
                    "or aliases (*name) that contain themselves",
                )
            ]
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "malformed YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise ConfigError(
            [
                Finding(
                    severity=Severity.ERROR,
                    code="yaml-syntax",
                    message=f"malformed YAML: {problem}{context}",
                    file=file,
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                    hint="fix the YAML at this position (indentation, quoting, a missing ':')",
                )
            ]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(
            [
                Finding(
                    severity=Severity.ERROR,
                    code="yaml-syntax",
                    message=f"malformed YAML: {exc}",
                    file=file,
                    hint="fix the YAML syntax",
                )
            ]
        ) from None
    finally:
        loader.dispose()
    if duplicates:
        raise ConfigError(duplicates)
    return LoadedYaml(file=file, data=data, positions=positions)


def _convert(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    *,
    path: KeyPath,
    positions: dict[KeyPath, tuple[int, int]],
    duplicates: list[Finding],
    file: str,
    budget: list[int],
) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooBigError
    if len(path) > MAX_DEPTH:  # aliases nest what the text does not (`&a [*a]`)
        raise _TooDeepError(node.start_mark)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<:` merge keys as SafeLoader would
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            mark = key_node.start_mark
            if not isinstance(key_node, yaml.ScalarNode):
                # `? [a, b]: x`: no configuration key is a list or a mapping (and building
                # one through aliases could nest without bound)
                raise _NotScalarKeyError(mark)
            key = loader.construct_object(key_node, deep=True)
            key_text = key if isinstance(key, str) else str(key)
            child = (*path, key_text)
            if key_text in result:
                duplicates.append(
                    Finding(
                        severity=Severity.ERROR,
                        code="duplicate-key",
                        message=f"key {key_text!r} appears twice; YAML keeps only the last one",
                        file=file,
                        key_path=format_key_path(child),
                        line=mark.line + 1,
                        column=mark.column + 1,
                        hint="merge the two entries into one",
                    )
                )
            positions[child] = (mark.line + 1, mark.column + 1)
            result[key_text] = _convert(
                loader,
                value_node,
                path=child,
                positions=positions,
                duplicates=duplicates,
                file=file,
                budget=budget,
            )
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item_node in enumerate(node.value):
            child = (*path, index)
            mark = item_node.start_mark
            positions[child] = (mark.line + 1, mark.column + 1)
            items.append(
                _convert(
                    loader,
                    item_node,
                    path=child,
                    positions=positions,
                    duplicates=duplicates,
                    file=file,
                    budget=budget,
                )
            )
        return items
    return loader.construct_object(node, deep=True)
