"""What every adapter kind provides: :class:`Kind`, with the defaults a kind may keep.

A kind's targets all answer the format's own interface (``shape``, ``dtype``, ``num_params``,
``to_dense``, ``merged``, ``payload_tensors``, ``manifest_entry``, ``check``); the behaviours here are
the ones callers used to pick by testing types. The defaults are the generic, dense ones (bounded
by ``limits.MAX_DENSE``): a kind overrides what it can do from its payload alone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import S2RegError

if TYPE_CHECKING:
    import numpy as np

    from ..ops.fuse_results import FuseResult

# (common elements, union, x.x, y.y, x.y, |x - y|^2 on the common elements, equal there): one diff comparison
Comparison = tuple[int, int, float, float, float, float, bool]


def sums(x: Any, y: Any) -> tuple[float, float, float, float, bool]:
    """x.x, y.y, x.y, |x - y|^2 and equality of two deltas on the same elements (float64)."""
    import numpy as np

    from ..format.arrays import dot

    x, y = x.astype(np.float64).reshape(-1), y.astype(np.float64).reshape(-1)
    return dot(x, x), dot(y, y), dot(x, y), dot(x - y, x - y), bool(np.array_equal(x, y))


def dense_delta(target: Any, name: str) -> np.ndarray:
    """A target's full delta, refused beyond ``limits.MAX_DENSE`` elements (FORMAT §8)."""
    from ..format import limits

    limits.check_dense(target.shape, name)
    return target.to_dense()


def extract_head(change: Any) -> list[str]:
    """The first cells of an ``s2reg extract`` table row, alike for every kind: tensor, changed, where, stored."""
    where = f"{change.count} {change.axis}" if change.axis else (str(change.count) if change.count else "-")
    return [change.name, f"{100 * change.changed_fraction:.2f}%", where, f"{change.stored:,}"]


class Kind:
    """One adapter kind: its name, its types, and its behaviour wherever the package acts per kind."""

    name: ClassVar[str]
    #: merge then unmerge gives the base back bit for bit (SURGERY §2), so the ledger may expect its bytes
    exact: ClassVar[bool] = False
    #: its LoRA export picks ranks by a relative-error tolerance (a cached export depends on that tolerance)
    lora_by_tolerance: ClassVar[bool] = True
    #: its targets on MoE expert parameters export to LoRA (``interop/peft_experts``)
    experts_to_lora: ClassVar[bool] = False
    #: the ``s2reg train`` options that size an adapter of this kind in place of ``--budget`` (None: it takes a budget)
    size_options: ClassVar[str | None] = "its own options"
    #: draws a selection panel in ``inspect --plot`` (from rows with ``indices`` and ``of``)
    plots_selection: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<kind {self.name}>"

    #: its target and adapter classes, by their names in ``s2reg.format`` (imported on first use)
    format_names: ClassVar[tuple[str, str]]

    # -- types -----------------------------------------------------------------------------
    @property
    def target_type(self) -> type:
        from .. import format

        return getattr(format, self.format_names[0])

    @property
    def adapter_type(self) -> type:
        from .. import format

        return getattr(format, self.format_names[1])

    # -- merge math --------------------------------------------------------------------------
    def region(self, target: Any) -> tuple[str, np.ndarray] | None:
        """``(axis, indices)``: the rows or columns a merge rewrites; None when it rewrites the whole tensor."""
        return None

    def merged_region(self, target: Any, current: np.ndarray, *, subtract: bool = False, name: str = "tensor",
                      check_reversible: bool = False) -> np.ndarray:
        """The region's values ``current`` merged (unmerged with ``subtract``): the format's one merge rule."""
        return target.merged(current, subtract=subtract)

    def undoes(self, target: Any, current: np.ndarray, merged: np.ndarray) -> bool:
        """Whether unmerging from ``merged`` gives ``current`` back bit for bit (only an exact kind promises it)."""
        return False

    def permuted(self, name: str, target: Any, permutation: Any, info: Any) -> Any:
        """``target`` in the coordinates of a co-permuted checkpoint (``ops/permute``)."""
        raise S2RegError(f"{name}: {self.name} targets cannot be co-permuted")

    # -- statistics and text -------------------------------------------------------------------
    def stats_columns(self, target: Any) -> dict[str, Any]:
        """The kind's own columns of an ``inspect`` row (from the payload: never densified); ``delta_norm`` at least."""
        raise NotImplementedError

    def selection_text(self, row: dict[str, Any]) -> str:
        """An ``inspect`` row's selection column."""
        raise NotImplementedError

    def card_text(self, row: dict[str, Any]) -> str:
        """A model card's selection column."""
        return self.selection_text(row)

    # -- diff --------------------------------------------------------------------------------
    def compare(self, name: str, ta: Any, tb: Any) -> Comparison:
        """Two targets of this kind on one tensor (``ops/diff``): by default, their dense deltas (capped)."""
        numel = math.prod(ta.shape)
        return (numel, numel, *sums(dense_delta(ta, name), dense_delta(tb, name)))

    def region_delta(self, target: Any) -> np.ndarray:
        """The delta on :meth:`region` (the kind must have one)."""
        raise NotImplementedError

    def lines(self, target: Any, dim: int, indices: np.ndarray, *, name: str) -> np.ndarray:
        """The delta on the rows (``dim`` 0) or columns (1) ``indices``; by default from the dense delta (capped)."""
        import numpy as np

        return np.take(dense_delta(target, name), indices, axis=dim)

    # -- fuse, interop, extract, training --------------------------------------------------------
    def fuse(self, adapters: Any, names: list[str], method: str, options: Any, generator: Any, params: dict,
             fingerprints: dict, base: Any) -> FuseResult:
        raise S2RegError(f"{self.name} adapters cannot be fused")

    def lora_factors(self, name: str, target: Any, rank: int | None, max_error: float, transposed: bool) -> tuple:
        """``(A [r, in], B [out, r], relative error)`` in the ``nn.Linear`` convention (``interop/peft_lora``)."""
        raise S2RegError(f"{name}: {self.name} targets do not export to LoRA")

    def lora_rank_text(self, needed: int, tolerance: float) -> str:
        """Why a served LoRA export of this kind needs rank ``needed`` (``vllm/lora_cache``)."""
        return f"is a LoRA within relative error {tolerance:g} only from rank {needed} on"

    def check_extract_options(self, options: dict[str, Any]) -> None:
        """Refuse ``s2reg extract`` flags this kind cannot use (S2RegError), before any checkpoint is read."""
        raise S2RegError(f"{self.name} adapters cannot be extracted")

    def extract(self, base: Any, tuned: Any, *, base_name: str, progress: Any, options: dict[str, Any]) -> Any:
        """The ``ExtractResult`` turning ``base`` into ``tuned`` (``ops/extract``), from the ``s2reg extract`` flags."""
        raise S2RegError(f"{self.name} adapters cannot be extracted")

    extract_columns: ClassVar[list[str]] = []

    def extract_row(self, change: Any) -> list[str]:
        """One row of the ``s2reg extract`` table under :attr:`extract_columns`."""
        raise NotImplementedError

    @property
    def train_config(self) -> type | None:
        """The ``s2reg train --method NAME`` config class (its flags), or None when the kind is not trained here."""
        return None

    def prepare_training(self, model: Any, options: Any, examples: list, pad: int, arch_file: Any,
                         device: str) -> tuple[Any, Any]:
        """The model made trainable, and the options as chosen (``train/session``)."""
        raise S2RegError(f"{self.name} adapters are not trained by s2reg")

    def train_summary(self, config: Any, options: Any) -> dict[str, Any]:
        """The kind's own fields of the ``s2reg train --json`` summary."""
        return {}

    def train_rows(self, config: Any, options: Any) -> list[tuple[str, str]]:
        """The kind's own rows of the training summary table (after the objective)."""
        return []
