"""Checkpoint IO, kept apart from the math: lazy reading of safetensors checkpoints and
streaming, sharded, atomic writing in the Hugging Face layout.

Nothing here knows about adapters; surgery ops receive tensors and return tensors.
"""

from .reader import CheckpointSource, TensorInfo
from .writer import (
    TensorSpec,
    copy_side_files,
    plan_shards,
    save_state_dict,
    write_checkpoint,
)

__all__ = ["CheckpointSource", "TensorInfo", "TensorSpec", "copy_side_files", "plan_shards", "save_state_dict", "write_checkpoint"]
