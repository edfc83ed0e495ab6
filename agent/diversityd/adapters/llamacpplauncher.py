"""llama-cpp-python's server (`python -m llama_cpp.server ARGS`) with a quiet journal.

Run by `diversityd-<provider>.service` with llama-cpp-python's interpreter, as a script
(`python .../llamacpplauncher.py --log-level warning ARGS`): standard library only here.
The server's own `__main__` runs uvicorn with its access log on and no way to turn it off,
so every probe (two a round) became a journal line. This runs that same `__main__` with
`uvicorn.run` told the level: the access log only at `debug`.
"""

import argparse
import os
import runpy
import sys
from typing import Any

LEVELS = ("error", "warning", "info", "debug")


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--log-level", choices=LEVELS, default="warning")
    ours, server_args = parser.parse_known_args()
    # Run as a script, this file's folder (the diversityd package) comes first on sys.path,
    # and its modules (config, gguf, ...) could shadow the server's own imports.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]

    import uvicorn

    run = uvicorn.run

    def quiet_run(app: Any, **kwargs: Any) -> None:
        kwargs.setdefault("log_level", ours.log_level)
        kwargs.setdefault("access_log", ours.log_level == "debug")
        run(app, **kwargs)

    uvicorn.run = quiet_run
    sys.argv = ["llama_cpp.server", *server_args]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
