"""Frozen encoders: :mod:`.text` (one text encoder),
:mod:`.text_set` and :mod:`.combine` (several, combined as diffusers' SD3 and FLUX pipelines combine them),
:mod:`.autoencoder`, :mod:`.frozen` (all of them as one component), :mod:`.loading` (where their weights come from)
and :mod:`.diffusers_folder` (a diffusers pipeline folder read into their sub-configs).

The conditioning type they produce lives on the bottom floor, :mod:`flowmatch.conditioning` (``.conditioning`` here
re-exports it for older imports). Nothing is imported here, so each submodule stays cheap to import.
"""
