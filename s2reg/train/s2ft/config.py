"""What S2FT trains: how many heads and FFN channels per layer, which projections, chosen how."""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")
HEAD_ROLES = ("q", "k", "v", "o")
CHANNEL_ROLES = ("up", "gate", "down")


@dataclass
class S2FTConfig:
    """S2FT hyper-parameters (the S2FT paper, §3).

    ``channels`` FFN channels and ``heads`` attention heads per layer are selected by ``strategy``
    (S2FT-R ``random``, -W ``weight``, -A ``activation``, -S ``weight_activation``, -G
    ``gradient``), taking the ``largest`` or ``smallest`` scores. The selected units are trained
    in ``roles`` (a role the model's family lacks is refused): by default the paper's output side,
    ``o`` for heads and ``down`` for channels. Heads default to 0: on GQA models the paper trains ``down`` only; ask for heads
    explicitly. ``exclude`` adapters' units are never chosen, so the result fuses with them
    without overlap. ``layers`` limits training to some layers (default: all).
    """

    channels: int = 32
    heads: int = 0
    roles: tuple[str, ...] | None = None
    strategy: str = "random"
    order: str = "largest"
    seed: int = 0
    exclude: list = field(default_factory=list)
    layers: list[int] | None = None

    def check(self) -> None:
        from ...errors import S2RegError

        if self.strategy not in STRATEGIES:
            raise S2RegError(f"unknown selection strategy {self.strategy!r} (choose from {', '.join(STRATEGIES)})")
        if self.order not in ("largest", "smallest"):
            raise S2RegError(f"order must be 'largest' or 'smallest', got {self.order!r}")
        if self.channels < 0 or self.heads < 0:
            raise S2RegError("channels and heads must not be negative")
        unknown = set(self.roles or ()) - set(HEAD_ROLES) - set(CHANNEL_ROLES)
        if unknown:
            raise S2RegError(f"unknown roles {sorted(unknown)} (choose from {', '.join(HEAD_ROLES + CHANNEL_ROLES)})")
        if not self.channels and not self.heads:
            raise S2RegError("nothing to train: ask for some channels and/or heads")
