"""The LiteLLM proxy as a process: its offline environment and its config check."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Without these LiteLLM fetches a price map (and four other files) from the internet at
# import, blocking 5 s on DNS on a machine that cannot reach it.
OFFLINE_ENV: Mapping[str, str] = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
}


@dataclass(frozen=True)
class ConfigCheck:
    ok: bool
    output: str


def check_config_file(
    litellm_bin: Path, config_file: Path, env: Mapping[str, str], timeout_s: float = 120
) -> ConfigCheck:
    """`litellm --config X --validate_config`: LiteLLM's own (shape-only) verdict."""
    result = subprocess.run(
        [str(litellm_bin), "--config", str(config_file), "--validate_config"],
        env={**env, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return ConfigCheck(ok=result.returncode == 0, output=result.stdout + result.stderr)
