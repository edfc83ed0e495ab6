"""Findings and errors: every problem names the file, the key path and a fix."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    """One result of validation. `code` is stable; other tools may match on it."""

    severity: Severity
    code: str
    message: str
    file: str | None = None
    key_path: str | None = None
    line: int | None = None
    column: int | None = None
    hint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "file": self.file,
            "key_path": self.key_path,
            "line": self.line,
            "column": self.column,
            "hint": self.hint,
        }

    def format(self) -> str:
        """One human line (plus a hint line): `file:line:col: key: message`."""
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        key = f" {self.key_path}:" if self.key_path else ""
        text = f"{where}:{key} {self.severity.value}[{self.code}]: {self.message}"
        if self.hint:
            text += f"\n    fix: {self.hint}"
        return text


class DiversitydError(Exception):
    """Base of every error diversityd raises on purpose; the CLI maps it to an exit code."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(DiversitydError):
    """The configuration cannot be used; carries every error finding, located."""

    exit_code = 2

    def __init__(self, findings: Iterable[Finding]) -> None:
        self.findings = tuple(findings)
        first = self.findings[0].format() if self.findings else "invalid configuration"
        super().__init__(first)


class UsageError(DiversitydError):
    exit_code = 2
