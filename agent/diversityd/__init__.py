"""diversityd: keeps a workstation's local LLM servers and their LiteLLM gateway alive."""

__version__ = "0.1.0"
