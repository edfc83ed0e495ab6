"""The rendered example config passes a real LiteLLM's own `--validate_config`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diversityd.adapters.litellm import check_config_file
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration


def render(*args: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diversityd.cli",
            "render",
            "--config-dir",
            str(REPO_ROOT / "config"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_rendered_example_config_passes_litellm_validation(
    litellm_python: Path, tmp_path: Path
) -> None:
    litellm_bin = litellm_python.parent / "litellm"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LITELLM_MASTER_KEY": "sk-test"}
    good = tmp_path / "gateway.yaml"
    good.write_text(render("--down", "llama_cpp_python"))
    verdict = check_config_file(litellm_bin, good, env)
    assert verdict.ok, verdict.output
    assert "llama-cpp-default" in verdict.output  # LiteLLM lists the models it loaded

    # The check is not vacuous: the same document with one deployment broken is refused.
    document = yaml.safe_load(good.read_text())
    del document["model_list"][0]["litellm_params"]["model"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(document))
    assert not check_config_file(litellm_bin, broken, env).ok
