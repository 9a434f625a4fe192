"""Checkpoint surgery: merge and unmerge adapters (into a new checkpoint or in place, journaled),
recover interrupted in-place work, and co-permute checkpoints. IO goes through ``s2reg.tensors``;
the per-tensor math is in ``s2reg.format`` and ``s2reg.ops``.

Names are imported on first use, so a command that needs one module of the package (``validate --base``
reads checkpoints through ``surgery.plan``) does not load the others.
"""

from .._lazy import exports

_MODULES = {
    "merge": ".rewrite", "unmerge": ".rewrite",
    "merge_in_place": ".inplace", "unmerge_in_place": ".inplace", "pending": ".inplace", "recover": ".inplace",
    "Ledger": ".ledger",
    "permute_checkpoint": ".permute", "unpermute_checkpoint": ".permute",
}
__getattr__ = exports(__name__, _MODULES, globals())
__all__ = sorted(_MODULES)
