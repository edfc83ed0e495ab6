"""The user's configuration at three points of its history, built from the seed documents.

- v1.7.1.1 (after the hotfix): llama_cpp providers list their models.
- v1.7.1 (before the hotfix): llama_cpp providers have no `models:`; their names exist only
  in `exact_matches`. The seeds' generator dropped them; diversityd must not.
- the deep analysis' proposed chains: `llama-cpp-default -> gpt-oss:20b-cloud` while
  `gpt-oss:20b-cloud -> llama-cpp-default`: a cycle.
"""

from __future__ import annotations

from pathlib import Path

OLLAMA = """\
  ollama:
    type: ollama
    base_url: http://127.0.0.1:11434
    status: active
    models:
      - name: llama3.1:latest
        context_length: 8192
      - name: qwen2.5-coder:7b
      - name: mythomax-l2-13b-q5_k_m
  ollama_cloud:
    type: ollama
    base_url: http://127.0.0.1:11434
    status: active
    models:
      - deepseek-v3.1:671b-cloud
      - qwen3-coder:480b-cloud
      - kimi-k2:1t-cloud
      - gpt-oss:120b-cloud
      - gpt-oss:20b-cloud
      - glm-4.6:cloud
  vllm-qwen:
    type: vllm
    base_url: http://127.0.0.1:8001
    status: active
    models:
      - name: qwen-coder-vllm
        model: Qwen/Qwen2.5-Coder-7B-Instruct-AWQ
  vllm-dolphin:
    type: vllm
    base_url: http://127.0.0.1:8002
    status: disabled
    models:
      - name: dolphin-uncensored-vllm
"""

LLAMA_CPP_HOTFIXED = """\
  llama_cpp_python:
    type: llama_cpp
    base_url: http://127.0.0.1:8000
    status: active
    models:
      - name: llama-cpp-default
        description: "GGUF model via llama.cpp Python bindings"
        context_length: 8192
        tags: [local, gguf, cuda_optimized]
    configuration:
      n_gpu_layers: -1
  llama_cpp_native:
    type: llama_cpp
    base_url: http://127.0.0.1:8080
    status: active
    models:
      - name: llama-cpp-native
        description: "GGUF model via llama.cpp native C++ server"
        context_length: 8192
        tags: [local, gguf, native, fastest]
"""

# v1.7.1 as deployed: "NO models: field!" (the hotfix document quotes it).
LLAMA_CPP_BEFORE_HOTFIX = """\
  llama_cpp_python:
    type: llama_cpp
    base_url: http://127.0.0.1:8000
    status: active
    configuration:
      n_gpu_layers: -1
  llama_cpp_native:
    type: llama_cpp
    base_url: http://127.0.0.1:8080
    status: active
"""

EXACT_MATCHES = """\
exact_matches:
  "llama-cpp-default":
    provider: llama_cpp_python
    priority: primary
    fallback: null
    description: "GGUF model via llama.cpp Python bindings (CUDA-optimized, 8K context)"
  "llama-cpp-native":
    provider: llama_cpp_native
    priority: primary
    fallback: null
    description: "GGUF model via llama.cpp native C++ server (maximum performance, fastest TTFB)"
"""

CHAINS_COMMON = """\
  "qwen2.5-coder:7b":
    chain: [qwen-coder-vllm, qwen3-coder:480b-cloud]
  "qwen-coder-vllm":
    chain: [qwen3-coder:480b-cloud]
  "qwen3-coder:480b-cloud":
    chain: [deepseek-v3.1:671b-cloud]
  "deepseek-v3.1:671b-cloud":
    chain: [kimi-k2:1t-cloud, mythomax-l2-13b-q5_k_m]
  "kimi-k2:1t-cloud":
    chain: [glm-4.6:cloud]
  "glm-4.6:cloud":
    chain: [gpt-oss:120b-cloud]
  "gpt-oss:120b-cloud":
    chain: [mythomax-l2-13b-q5_k_m]
  "mythomax-l2-13b-q5_k_m":
    chain: [llama3.1:latest]
"""

# Routing v1.7.1 (implementation summary, "After").
CHAINS_V171 = """\
  "llama3.1:latest":
    chain:
      - llama-cpp-default      # Cross-provider diversity
      - gpt-oss:20b-cloud      # Cloud safety net
  "gpt-oss:20b-cloud":
    chain:
      - llama-cpp-default      # Avoid circular with llama3.1
      - llama-cpp-native       # Ultimate local fallback (new terminal)
  "llama-cpp-default":
    chain:
      - llama-cpp-native       # Same provider, different binding (faster)
  "llama-cpp-native":
    chain: []                  # New terminal node (fastest local)
"""

# The deep analysis' "Proposed Architecture": llama-cpp-default gains gpt-oss:20b-cloud.
CHAINS_DEEP_ANALYSIS = """\
  "llama3.1:latest":
    chain:
      - llama-cpp-default      # Cross-provider diversity
      - gpt-oss:20b-cloud      # Cloud safety net
    tier: local
  "gpt-oss:20b-cloud":
    chain:
      - llama-cpp-default      # Avoid circular with llama3.1
      - llama-cpp-native       # Ultimate local fallback
    tier: cloud_entry
  "llama-cpp-default":
    chain:
      - llama-cpp-native       # Same provider, different binding
      - gpt-oss:20b-cloud      # Cloud safety net
    tier: local
  "llama-cpp-native":
    chain: []                  # True terminal
    tier: local
"""


def providers_yaml(llama_cpp: str) -> str:
    return "providers:\n" + OLLAMA + llama_cpp


def mappings_yaml(chains: str) -> str:
    return EXACT_MATCHES + "\nfallback_chains:\n" + CHAINS_COMMON + chains


def write(directory: Path, providers: str, mappings: str, settings: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "providers.yaml").write_text(providers)
    (directory / "model-mappings.yaml").write_text(mappings)
    if settings is not None:
        (directory / "diversityd.yaml").write_text(settings)
    return directory


def v1711(directory: Path) -> Path:
    return write(directory, providers_yaml(LLAMA_CPP_HOTFIXED), mappings_yaml(CHAINS_V171))


def v171_before_hotfix(directory: Path) -> Path:
    return write(directory, providers_yaml(LLAMA_CPP_BEFORE_HOTFIX), mappings_yaml(CHAINS_V171))


def deep_analysis(directory: Path) -> Path:
    return write(directory, providers_yaml(LLAMA_CPP_HOTFIXED), mappings_yaml(CHAINS_DEEP_ANALYSIS))
