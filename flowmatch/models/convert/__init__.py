"""The shared weight-conversion machinery: :mod:`.keymap` (key maps applied both ways, bit for bit), :mod:`.lora`
(adapters written in a LoRA file format, and merged), :mod:`.lora_formats` (what a format is, family-agnostic),
:mod:`.lora_read` (a LoRA file in any of a family's formats read back as our adapters), and for the other adapter
kinds (DoRA, LoHa, LoKr) :mod:`.adapters` (written as diffusers/peft name them, and merged) and
:mod:`.adapters_read` (read back). Each family's key tables (``flowmatch/families/<family>/convert.py``) and LoRA
formats (``lora_formats.py``) live in its folder; :mod:`flowmatch.families.convert` converts whole models.
"""
