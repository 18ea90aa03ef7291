"""llmbalancer: one fast, reliable endpoint in front of a fleet of LLM inference servers."""

__version__ = "0.1.0"
