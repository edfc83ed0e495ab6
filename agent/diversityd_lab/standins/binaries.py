"""The stand-ins behind the real binaries' command lines, so the units diversityd renders
for Ollama and vLLM run them unchanged: `ollama serve` (address from $OLLAMA_HOST) and
`vllm serve MODEL --host H --port P --served-model-name N ...`.

`write_executables(directory, python)` writes `ollama` and `vllm` scripts there; a
configuration then names them as `executable:`. The Ollama stand-in serves the names in
$DIVERSITYD_STANDIN_MODELS (comma-separated; the unit's `environment:` sets it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from diversityd.adapters.files import write_atomic
from diversityd_lab.standins import ollama, vllm

MODELS_ENV = "DIVERSITYD_STANDIN_MODELS"


def ollama_main(argv: Sequence[str]) -> int:
    if list(argv[:1]) != ["serve"]:
        print("this stand-in only knows `ollama serve`", file=sys.stderr)
        return 2
    host, _, port = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    models = [m for m in os.environ.get(MODELS_ENV, "").split(",") if m]
    if not models:
        print(f"set {MODELS_ENV} to the models to serve", file=sys.stderr)
        return 2
    args = ["--host", host or "127.0.0.1", "--port", port]
    for model in models:
        args += ["--model", model]
    return ollama.main(args)


def vllm_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="8000")
    parser.add_argument("--served-model-name", nargs="+")
    # Accepted and ignored: the real server's sizing options.
    for option in ("--max-model-len", "--max-num-seqs", "--gpu-memory-utilization"):
        parser.add_argument(option)
    args, _unknown = parser.parse_known_args(argv)
    names = args.served_model_name or [args.model]
    return vllm.main(
        ["--host", args.host, "--port", str(args.port), "--model", args.model,
         "--served-model-name", *names]
    )  # fmt: skip


def write_executables(directory: Path, python: str) -> dict[str, Path]:
    paths = {}
    for name in ("ollama", "vllm"):
        path = directory / name
        script = (
            "#!/bin/sh\n"
            f"# A stand-in for {name}, written by diversityd for tests and the demo.\n"
            f'exec {shlex.quote(python)} -m diversityd_lab.standins.binaries {name} "$@"\n'
        )
        write_atomic(path, script, mode=0o755)
        paths[name] = path
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("ollama", "vllm"):
        print(
            "usage: python -m diversityd_lab.standins.binaries ollama|vllm ARGS...", file=sys.stderr
        )
        return 2
    return ollama_main(args[1:]) if args[0] == "ollama" else vllm_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
