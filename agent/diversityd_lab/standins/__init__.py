"""Stand-ins for Ollama and vLLM: small servers that speak their HTTP surface.

Neither binary can be installed on the machines this project is built on, so tests and the
demo run these instead, as real processes (and real systemd units). Standard library only:
`python -m diversityd_lab.standins.ollama` and `python -m diversityd_lab.standins.vllm`.
"""
