"""Frozen encoders: :mod:`.conditioning` (the one conditioning type), :mod:`.text` and :mod:`.autoencoder` (the
models), :mod:`.frozen` (both as one component) and :mod:`.loading` (where their weights come from).

Nothing is imported here, so ``flowmatch.encoders.conditioning`` stays cheap to import (torch only).
"""
