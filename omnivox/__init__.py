"""omnivox: realtime speech generation for omni models."""

__version__ = "0.1.0"
