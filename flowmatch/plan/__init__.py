"""The memory planner: will a recipe fit a device, and what to change so that it does, derived from the model
itself (parameters counted and activations traced on the meta device).

    trace.py    parameter counts, saved-tensor bytes of one meta-device forward, optimizer state
    live.py     the bytes alive at once while a function runs (a few-step objective's targets)
    frozen.py   the text encoders' and the autoencoder's sizes from their configs
    shape.py    a recipe's model, counted: ModelCost and its sequence
    memory.py   the peak of one rank under Settings, term by term
    levers.py   what lowers the peak, the largest micro batch, the cheapest fit
    devices.py  the accelerators and their memory, with sources
    planner.py  make_plan(recipe, device, world) -> Plan
    report.py   text and JSON
    budget.py   distributed.memory_budget_gb: the settings flowmatch train applies
"""
