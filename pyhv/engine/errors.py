"""The engine's exception root."""

from pyhv.errors import PyhvError


class EngineError(PyhvError):
    """Something the engine could not do."""
