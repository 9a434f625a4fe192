"""What S2FT trains: how many heads and FFN channels per layer, which projections, chosen how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...arch.schema import CHANNEL_ROLES, HEAD_ROLES, ROLES
from ..settings import setting

STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")


def _adapter_digests(adapters) -> list[str]:
    from ...format.digest import sha256_bytes

    return [sha256_bytes(a.payload_bytes()) for a in adapters]


@dataclass(frozen=True)
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

    method: ClassVar[str] = "s2ft"
    # Learns without wrecking the base on every family tested (bench/quality.py; docs/training.md).
    default_lr: ClassVar[float] = 3e-3

    channels: int = setting(32, "s2ft: FFN channels per layer.", low=0)
    heads: int = setting(0, "s2ft: attention heads per layer.", low=0)
    roles: tuple[str, ...] | None = setting(
        None, f"Projections to train, among the family's {','.join(ROLES)}; s2ft: default o for heads and down "
              "for channels.", type="names")
    strategy: str = setting("random", "s2ft: how units are selected.", choices=STRATEGIES)
    order: str = setting("largest", "s2ft: take the largest or smallest scores.", choices=("largest", "smallest"))
    seed: int = setting(0, None)
    exclude: tuple = setting((), "s2ft: choose channels/heads disjoint from this adapter (repeatable).",
                             type="adapters", record=_adapter_digests)
    layers: tuple[int, ...] | None = setting(None, "Train only these layers (comma-separated indices) [default: all].",
                                             type="ints")

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
            raise S2RegError(f"unknown roles {sorted(unknown)} (choose from {', '.join(ROLES)})")
        if not self.channels and not self.heads:
            raise S2RegError("nothing to train: ask for some channels and/or heads")
