"""dsbuild: build context-specific datasets for instruction-based image editing."""

__version__ = "0.1.0"
