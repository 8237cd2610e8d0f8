"""The accelerators the planner knows, each with its memory as its maker's data sheet gives it (GiB: HBM and GDDR
are sized in powers of two), and the data sheet it comes from."""

from __future__ import annotations

from dataclasses import dataclass

from flowmatch.errors import choice_error

GIB = 2**30


def size(n: float) -> str:
    """Bytes as GiB (two decimals), or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Device:
    """One accelerator: what ``flowmatch plan --device NAME`` plans for."""

    name: str
    memory_gib: float
    source: str
    cuda: bool = True
    """A CUDA device: the plan adds the CUDA context and the caching allocator's headroom."""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


_H100 = "nvidia.com/en-us/data-center/h100 (H100 SXM5 / PCIe data sheet)"
_H200 = "nvidia.com/en-us/data-center/h200 (H200 data sheet)"
_A100 = "nvidia.com/en-us/data-center/a100 (A100 40GB / 80GB data sheet)"
_L40S = "nvidia.com/en-us/data-center/l40s (L40S data sheet)"
_ADA = "nvidia.com/en-us/geforce/graphics-cards/40-series (RTX 4090 / 4080 specifications)"

#: name -> Device.
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100", 80, _H100),
    Device("h200", 141, _H200),
    Device("a100-40", 40, _A100),
    Device("a100-80", 80, _A100),
    Device("l40s", 48, _L40S),
    Device("rtx4090", 24, _ADA),
    Device("rtx4080", 16, _ADA),
)}


def get_device(name: str) -> Device:
    """The device called ``name``; ValueError naming the known ones and the nearest spelling."""
    if name not in DEVICES:
        raise choice_error("--device", name, DEVICES)
    return DEVICES[name]


def budget_device(memory_gib: float, *, cuda: bool = True) -> Device:
    """A device of ``memory_gib`` GiB (``--memory-gb``, ``distributed.memory_budget_gb``)."""
    if not memory_gib > 0:
        raise ValueError(f"a memory budget must be a positive number of GiB, got {memory_gib}")
    return Device(f"{memory_gib:g} GiB", float(memory_gib), "given", cuda=cuda)
