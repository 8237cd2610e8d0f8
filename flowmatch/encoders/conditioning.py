"""Moved to :mod:`flowmatch.conditioning` (the bottom floor); kept so that older imports still work."""

from flowmatch.conditioning import Conditioning

__all__ = ["Conditioning"]
