"""Build the NVML stand-in (nvmlshim.c) into a directory holding `libnvidia-ml.so.1`.

Point LD_LIBRARY_PATH at the directory and NVMLSHIM_CONFIG at a config file (see the C
source) for the process under test: nvidia-ml-py's `nvmlInit()` then loads the shim.

    python tests/nvmlshim/build.py      # prints the directory
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("nvmlshim.c")
LIBRARY = "libnvidia-ml.so.1"


class ShimBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diversityd" / "nvmlshim"


def build_shim(out_dir: Path | None = None) -> Path:
    """Compile the shim once per source version (cached); return the directory holding it."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target_dir = out_dir or cache_dir() / digest
    library = target_dir / LIBRARY
    if library.exists():
        return target_dir
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise ShimBuildError("no C compiler (gcc or cc) on PATH to build the NVML shim")
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as temp:
        partial = Path(temp) / LIBRARY
        result = subprocess.run(
            [
                compiler,
                "-shared",
                "-fPIC",
                "-O1",
                "-Wall",
                "-Werror",
                "-Wl,-soname," + LIBRARY,
                "-o",
                str(partial),
                str(SOURCE),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ShimBuildError(f"{compiler} failed to build the NVML shim:\n{result.stderr}")
        partial.replace(library)  # atomic: concurrent builders both end with a whole file
    return target_dir


def shim_environment(shim_dir: Path, config: Path | None) -> dict[str, str]:
    """The environment of a process that should see the shim instead of a driver."""
    env = dict(os.environ)
    previous = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = str(shim_dir) + (f":{previous}" if previous else "")
    if config is None:
        env.pop("NVMLSHIM_CONFIG", None)
    else:
        env["NVMLSHIM_CONFIG"] = str(config)
    return env


if __name__ == "__main__":
    print(build_shim())
    sys.exit(0)
