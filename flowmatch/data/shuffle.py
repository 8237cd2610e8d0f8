"""The seeded shuffle buffer and the small random generators a stream saves with its position.

numpy's PCG64 rather than Python's Mersenne Twister: its whole state is two 128-bit integers, so a saved
position holds the generator itself (a few dozen bytes) instead of 625 words or a count of draws to replay.
"""

from __future__ import annotations

import hashlib
from typing import Generic, Optional, TypeVar

import numpy as np

T = TypeVar("T")


def seeded(name: str) -> np.random.Generator:
    """A generator seeded by a string (e.g. "samples/{seed}/{epoch}/{stream}"), the same on every machine."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(hashlib.sha256(name.encode()).digest()[:16], "big")))


def save_rng(rng: np.random.Generator) -> list:
    """The generator's state as JSON-able values (hex strings for the 128-bit words)."""
    s = rng.bit_generator.state
    return [hex(s["state"]["state"]), hex(s["state"]["inc"]), int(s["has_uint32"]), int(s["uinteger"])]


def load_rng(saved: list) -> np.random.Generator:
    """The generator `save_rng` described, in the same state."""
    bits = np.random.PCG64()
    bits.state = {"bit_generator": "PCG64", "state": {"state": int(saved[0], 16), "inc": int(saved[1], 16)},
                  "has_uint32": int(saved[2]), "uinteger": int(saved[3])}
    return np.random.Generator(bits)


class ShuffleBuffer(Generic[T]):
    """Hold `size` items; once full, each new item replaces a random held one, which comes out (size 0: no
    shuffling, items pass straight through). `pop` drains what is held in random order at the end of an epoch."""

    def __init__(self, size: int, rng: np.random.Generator, items: Optional[list[T]] = None) -> None:
        self.size, self.rng = size, rng
        self.items: list[T] = list(items or [])

    def push(self, item: T) -> Optional[T]:
        """Add `item`; the item that leaves the buffer, or None while it fills."""
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        if self.size == 0:
            return item
        i = int(self.rng.integers(self.size))
        out, self.items[i] = self.items[i], item
        return out

    def pop(self) -> T:
        """A random held item, removed."""
        i = int(self.rng.integers(len(self.items)))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return self.items.pop()

    def __len__(self) -> int:
        return len(self.items)
