"""What a secret looks like: the one list that validation, adoption and the gateway's
pass-through settings all use. Pure.

A value is a secret by its shape (a known key prefix, a JWT, a URL with a password) or,
where adoption reads a hand-made unit, by its variable's name or as a long opaque token.
A refused secret is shown by its first characters only (`redact`).
"""

from __future__ import annotations

import re

# Key prefixes of the services a workstation's LLM stack talks to. Each needs a tail of
# token characters, so a flag such as `--sk-layers` or a name like `hf_cache` is no key.
_KEY_PREFIXES = (
    "sk-", "sk_", "rk-", "pk-",  # OpenAI, Anthropic (sk-ant-), Stripe-style keys
    "hf_",  # Hugging Face
    "ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_",  # GitHub
    "glpat-",  # GitLab
    "xoxa-", "xoxb-", "xoxp-", "xoxr-",  # Slack
    "AIza",  # Google (Gemini)
    "gsk_",  # Groq
)  # fmt: skip
_PREFIX = "(?:" + "|".join(re.escape(prefix) for prefix in _KEY_PREFIXES) + ")"
SECRET_VALUE = re.compile(
    r"(?:^|[\s=:\"'])" + _PREFIX + r"[A-Za-z0-9_\-.]{8,}"
    r"|(?:^|[^A-Z0-9])AKIA[0-9A-Z]{12,}"  # an AWS access key id
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"  # a JWT (base64 of `{"`)
    r"|(?:^|[\s=:\"'])Bearer\s+\S"
    r"|://[^/@\s:]+:[^/@\s]+@"  # a URL with a password in it
)
# An environment variable's name that says it holds one (adoption moves those to 0600).
SECRET_VARIABLE = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# A key in LiteLLM's pass-through settings whose value is a secret (by its last word).
SECRET_SETTING = re.compile(r"(pass(word)?|secret|token|api_?key|master_?key)$", re.IGNORECASE)
# Command-line flags that carry a secret: every user reads a command line (/proc/PID/cmdline).
SECRET_FLAG = re.compile(
    r"^--?(api[-_]?key|hf[-_]?token|token|password|secret)(=.*)?$", re.IGNORECASE
)
_STARTS_AS_KEY = re.compile("^" + _PREFIX)  # adoption: a short tail is no reason to keep it
_OPAQUE = re.compile(r"^[A-Za-z0-9_\-+=]{32,}$")  # long token-like strings (never paths)

SHOWN_CHARACTERS = 4


def looks_like_secret(value: str) -> bool:
    """Whether a value has the shape of a key or token (a known prefix, a JWT, a URL with
    a password): what validation refuses wherever a value would be copied into a file."""
    return bool(SECRET_VALUE.search(value))


def is_secret(name: str, value: str) -> bool:
    """Whether an environment value must stay out of YAML and unit files: its name says
    KEY, TOKEN, SECRET, PASSWORD, or its value looks like one, or it is a long opaque
    token (digits among letters, no `/`)."""
    if SECRET_VARIABLE.search(name):
        return bool(value)
    if looks_like_secret(value) or _STARTS_AS_KEY.match(value):
        return True
    return bool(_OPAQUE.match(value)) and any(c.isdigit() for c in value) and "/" not in value


def redact(value: str) -> str:
    """A secret as a message may show it: its first characters, then how long it was."""
    return f"{value[:SHOWN_CHARACTERS]}... ({len(value)} characters)"


SHOWN_LENGTH = 60


def quoted(value: object) -> str:
    """A user's value as a message quotes it: a secret redacted, a long value cut short
    (a finding is one line, whatever the file held)."""
    if isinstance(value, str) and looks_like_secret(value):
        return repr(redact(value))
    text = repr(value)
    return text if len(text) <= SHOWN_LENGTH else f"{text[: SHOWN_LENGTH - 3]}..."
