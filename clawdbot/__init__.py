"""clawdbot: a self-hosted AI-agent control center in front of one Ollama GPU."""

__version__ = "0.1.0"
