"""Frozen encoders: :mod:`.conditioning` (the one conditioning type), :mod:`.text` (one text encoder),
:mod:`.text_set` and :mod:`.combine` (several, combined as diffusers' SD3 and FLUX pipelines combine them),
:mod:`.autoencoder`, :mod:`.frozen` (all of them as one component), :mod:`.loading` (where their weights come from)
and :mod:`.diffusers_folder` (a diffusers pipeline folder read into their sub-configs).

Nothing is imported here, so ``flowmatch.encoders.conditioning`` stays cheap to import (torch only).
"""
