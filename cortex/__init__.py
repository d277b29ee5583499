"""cortex: one OpenAI + Anthropic API in front of a fleet of GPU hosts."""

from cortex.harness import hookimpl

__version__ = "0.1.0"
__all__ = ["__version__", "hookimpl"]
