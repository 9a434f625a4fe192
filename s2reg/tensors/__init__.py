"""Checkpoint IO, kept apart from the math: tensor sources (lazy safetensors checkpoints, PyTorch
``.bin`` state dicts, in-memory state dicts, permuted views) and streaming, sharded, atomic writing
in the Hugging Face layout.

Nothing here knows about adapters; surgery ops receive tensors and return tensors.
"""

from .reader import CheckpointSource, TensorInfo
from .memory import MemorySource
from .source import PermutedView, TensorSource, open_source
from .torch_bin import TorchBinSource
from .writer import (
    TensorSpec,
    copy_side_files,
    plan_shards,
    save_state_dict,
    write_checkpoint,
)

__all__ = [
    "CheckpointSource", "MemorySource", "PermutedView", "TensorInfo", "TensorSource", "TensorSpec", "TorchBinSource",
    "copy_side_files", "open_source", "plan_shards", "save_state_dict", "write_checkpoint",
]
