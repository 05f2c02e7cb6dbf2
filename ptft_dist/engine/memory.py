"""Bytes of training state one rank holds, counted from the engine's own buffers.

Used by :meth:`Engine.state_memory_bytes` to show what ZeRO partitioning saves: a view into a flat
buffer (ZeRO's contiguous gradient / fp32 partitions) must count the buffer once, not once per view.
"""

from __future__ import annotations

from typing import Any

import torch

KINDS = ("params", "grads", "optimizer")


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr())


class ByteCounter:
    """Bytes of distinct storages per kind (a view into a flat buffer counts the buffer once)."""

    def __init__(self) -> None:
        self.seen: set = set()
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, obj: Any, depth: int = 0) -> None:
        """Count ``obj``: a tensor, or lists/tuples/dicts of them (optimizer state) a few levels deep."""
        self.bytes.setdefault(kind, 0)
        if isinstance(obj, torch.Tensor):
            if obj.numel() == 0 and obj.untyped_storage().nbytes() == 0:
                return
            key = _storage_key(obj)
            if key in self.seen:
                return
            self.seen.add(key)
            self.bytes[kind] += obj.untyped_storage().nbytes()
        elif depth < 3 and isinstance(obj, (list, tuple)):
            for o in obj:
                self.add(kind, o, depth + 1)
        elif depth < 3 and isinstance(obj, dict):
            for o in obj.values():
                self.add(kind, o, depth + 1)

    def totals(self) -> dict[str, int]:
        """``{"params", "grads", "optimizer", "total"}`` in bytes."""
        out = {k: self.bytes.get(k, 0) for k in KINDS}
        out["total"] = sum(out.values())
        return out
