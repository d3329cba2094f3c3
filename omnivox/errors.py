"""Typed errors: every message says what was wrong and what to do about it."""

from __future__ import annotations


class OmnivoxError(Exception):
    """Base class of every error omnivox raises on purpose."""


class CheckpointError(OmnivoxError):
    """A checkpoint file, key or shape is missing or wrong."""


class InvalidRequest(OmnivoxError):
    """The caller asked for something malformed (empty text, bad sample rate, unknown voice...)."""


class ContextTooLong(InvalidRequest):
    """The text does not fit the model's context or the session's cache."""


class EngineBusy(OmnivoxError):
    """More concurrent requests than the engine admits; retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineNotReady(OmnivoxError):
    """The model is still loading or warming up."""


class GenerationFailed(OmnivoxError):
    """Generation broke after it started (device error, cancelled by shutdown)."""
