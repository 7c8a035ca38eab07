"""llmux: one OpenAI-compatible endpoint for several model servers taking turns on a GPU."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmux")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
