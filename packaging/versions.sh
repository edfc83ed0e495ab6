# Pinned versions and the one cache root of every part diversityd installs or builds.
# Sourced by the other scripts in packaging/; keep it free of side effects.
LLAMA_CPP_PYTHON_VERSION="0.3.36"   # its sdist vendors the llama.cpp we build llama-server from
LITELLM_VERSION="1.106.2"           # measured in ../shared/recipes/litellm-here.md
PROMETHEUS_CLIENT_VERSION="0.26.0"

DIVERSITYD_CACHE="${DIVERSITYD_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/diversityd}"
LLAMA_SDIST="$DIVERSITYD_CACHE/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
LLAMA_BIN_DIR="$DIVERSITYD_CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION/bin"
LLAMA_CPP_PYTHON_VENV="$DIVERSITYD_CACHE/venvs/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
LITELLM_VENV="$DIVERSITYD_CACHE/venvs/litellm-$LITELLM_VERSION"
PIP_CACHE_DIR="${PIP_CACHE_DIR:-$DIVERSITYD_CACHE/pip}"
export PIP_CACHE_DIR
