"""The shared weight-conversion machinery: :mod:`.keymap` (key maps applied both ways, bit for bit) and :mod:`.lora`
(adapters in diffusers' names, and merged). Each family's key tables live in its folder
(``flowmatch/families/<family>/convert.py``); :mod:`flowmatch.families.convert` converts whole models.
"""
