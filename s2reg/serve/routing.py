"""Which sequences of a batch use which adapter, and so which rows of a layer's input they own."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import S2RegError


class Routing:
    """One adapter name (or None, the base) per sequence of a batch, grouped by adapter.

    A layer sees its input flattened to ``[rows, features]``: ``[batch, seq, features]`` flattens
    batch-major, and so do the ``[tokens, features]`` inputs that MoE blocks build, so sequence ``b``
    owns rows ``b * rows_per_sequence ...`` of every layer. :meth:`rows` gives an adapter's rows for a
    layer with ``count`` rows (cached: every layer of one forward step asks for the same counts).
    """

    def __init__(self, adapters: Sequence[str | None], device: torch.device | str = "cpu"):
        self.size = len(adapters)
        if self.size == 0:
            raise S2RegError("an empty batch: give one adapter name (or None for the base) per sequence")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(adapters):
            if name is not None:
                groups.setdefault(name, []).append(row)
        self.sequences = {name: torch.tensor(rows, dtype=torch.long, device=device) for name, rows in groups.items()}
        self._whole = {name for name, rows in groups.items() if len(rows) == self.size}
        self._rows: dict[tuple[str, int], torch.Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self.sequences)

    def covers_all(self, name: str) -> bool:
        """Whether every sequence of the batch uses ``name`` (its rows are then all rows: no gather needed)."""
        return name in self._whole

    def rows(self, name: str, count: int) -> torch.Tensor:
        """The rows of ``name``'s sequences in a layer input flattened to ``count`` rows."""
        key = (name, count)
        if key not in self._rows:
            if count % self.size:
                raise S2RegError(f"a layer saw {count} rows for a batch of {self.size} sequences: it does not keep "
                                 "the batch's sequences apart, so adapters cannot be applied per sequence")
            per = count // self.size
            sequences = self.sequences[name]
            offsets = torch.arange(per, device=sequences.device)
            self._rows[key] = (sequences[:, None] * per + offsets).reshape(-1)
        return self._rows[key]
