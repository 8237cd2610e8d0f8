"""Finishing the streams of an earlier layout: how a loader position resumes exactly on another layout.

See :class:`Drain`. The loader (flowmatch.data.loader) keeps the drains of a resumed run beside its own streams and
saves them in its state; each of its streams first finishes the saved streams dealt to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from flowmatch.data.stream import Position, StreamSpec

# Layout settings a resume may change exactly: the streams of the earlier layout are finished by this one's.
ELASTIC_KEYS = frozenset({"world_size", "num_workers", "batch_size", "shuffle_buffer"})


@dataclass
class Drain:
    """The streams of an earlier layout, finished by this layout's streams before their own.

    A resume on another number of ranks or workers (or another per-rank batch or shuffle buffer) cannot continue
    the saved streams as this layout's own: stream ``s`` of ``N`` reads its own share of every epoch. Instead the
    saved streams run on, each to the end of epoch ``stop - 1`` (the furthest any of them had begun), under the
    settings they were saved with (their count, their shuffle buffer; this layout's batch size), dealt to this
    layout's streams (saved stream ``o`` to stream ``o % M``), and this layout's own streams start at epoch
    ``stop``: every record of every epoch is read once, by exactly one stream.
    """

    layout: dict
    """The layout the streams were saved with."""
    stop: int
    """The first epoch they do not read."""
    positions: dict[int, Position]
    """The streams not finished yet (held by the rank whose streams finish them)."""

    def spec(self, spec: StreamSpec) -> StreamSpec:
        """This layout's ``spec`` as the saved streams need it."""
        return replace(spec, num_streams=self.layout["world_size"] * self.layout["num_workers"],
                       shuffle_buffer=self.layout["shuffle_buffer"], epochs=self.stop)

    def to_dict(self) -> dict:
        return {"layout": dict(self.layout), "stop": self.stop,
                "streams": {str(s): p.to_dict() for s, p in self.positions.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Drain":
        return cls(dict(d["layout"]), int(d["stop"]), {int(s): Position.from_dict(int(s), p)
                                                        for s, p in d["streams"].items()})


def drain_chain(drains: list["Drain"], stream: int, num_streams: int) -> list[tuple[int, int]]:
    """(drain index, saved stream) that stream ``stream`` of ``num_streams`` finishes, in order."""
    return [(g, o) for g, d in enumerate(drains) for o in sorted(d.positions) if o % num_streams == stream]


def held_records(detail: Mapping) -> int:
    """How many records a stream position holds in its shuffle buffer and partial groups (3 values a Ref)."""
    return (len(detail.get("buffer", [])) + sum(len(r) for r in detail.get("groups", {}).get("pending", []))) // 3
