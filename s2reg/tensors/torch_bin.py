"""Reading PyTorch ``pytorch_model.bin`` state dicts, as the official S2FT code saves its output.

The official training script ends with ``torch.save(model.state_dict(), "pytorch_model.bin")``
and ``config.to_json_file``; Hugging Face's older ``save_pretrained(..., safe_serialization=False)``
writes the same, sharded as ``pytorch_model-0000i-of-0000n.bin`` with
``pytorch_model.bin.index.json``. Such files are pickles: they are opened only with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers, with
``mmap=True`` (the data is mapped, not read) for every file in torch.save's zip format.

A state dict holds tied parameters twice (``lm_head.weight`` beside ``model.embed_tokens.weight``
under ``tie_word_embeddings``) where a safetensors checkpoint holds them once; the later name of
each tied pair is dropped, so the names match the base checkpoint's.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .memory import MemorySource
from .reader import indexed_shards, read_config

if TYPE_CHECKING:  # imported where used: reading a safetensors checkpoint never imports torch
    import torch

BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


def holds_torch_bin(directory: Path) -> bool:
    return (directory / BIN_NAME).is_file() or (directory / BIN_INDEX_NAME).is_file()


def _bin_files(directory: Path) -> list[Path]:
    index = directory / BIN_INDEX_NAME
    if not index.is_file():
        if not (directory / BIN_NAME).is_file():
            raise CheckpointError(f"{directory}: no {BIN_NAME} and no {BIN_INDEX_NAME}")
        return [directory / BIN_NAME]
    files, _ = indexed_shards(index)
    return files


def _load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    # torch.save's zip format is memory-mapped; the legacy format (before torch 1.6) cannot be, so it is read
    import torch

    mmap = zipfile.is_zipfile(file)
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as refused:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\.?\n|$)", str(refused))
        reason = found.group(1).strip() if found else "not a weights-only pickle"
        if reason.startswith("Unsupported global"):
            raise CheckpointError(f"{file}: refused, it holds more than tensors ({reason}); s2reg never unpickles objects") from None
        raise CheckpointError(f"{file}: not a readable PyTorch state dict ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as broken:
        raise CheckpointError(f"{file}: not a readable PyTorch state dict ({type(broken).__name__})") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise CheckpointError(f"{file}: not a state dict (expected a mapping of tensor names to tensors)")
    return loaded


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)


def _ties_word_embeddings(config: dict[str, Any] | None) -> tuple[bool, int | None]:
    config = config or {}
    text = config.get("text_config")
    text = text if isinstance(text, dict) else {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    vocab = config.get("vocab_size", text.get("vocab_size"))
    return bool(tied), vocab if isinstance(vocab, int) else None


def tied_duplicates(tensors: dict[str, torch.Tensor], config: dict[str, Any] | None) -> dict[str, str]:
    """Later name -> the earlier name it duplicates, in state-dict order (modules register embeddings first).

    A duplicate is a tensor that is the same view of the same storage as an earlier one (how
    ``torch.save`` keeps tied parameters), or, when the config ties word embeddings, a
    ``[vocab, hidden]`` matrix byte-identical to an earlier one (a state dict gathered into fresh
    storage loses the sharing, not the equality).
    """
    import torch

    tie_words, vocab = _ties_word_embeddings(config)
    dropped: dict[str, str] = {}
    kept: list[str] = []
    for name, tensor in tensors.items():
        partner = next((k for k in kept if _same_view(tensors[k], tensor)), None)
        if partner is None and tie_words and tensor.dim() == 2 and tensor.shape[0] == vocab:
            partner = next((k for k in kept if tensors[k].shape == tensor.shape and tensors[k].dtype == tensor.dtype
                            and torch.equal(tensors[k].view(torch.uint8), tensor.view(torch.uint8))), None)
        if partner is None:
            kept.append(name)
        else:
            dropped[name] = partner
    return dropped


class TorchBinSource(MemorySource):
    """A directory of ``pytorch_model.bin`` state dicts, memory-mapped, tied duplicates dropped.

    Satisfies :class:`~s2reg.tensors.source.TensorSource`. ``dropped`` maps each dropped name to
    the tensor it duplicates.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: expected a directory holding {BIN_NAME}")
        self.files = _bin_files(self.path)
        tensors: dict[str, Any] = {}
        for file in self.files:
            for name, tensor in _load_state_dict(file).items():
                if name in tensors:
                    raise CheckpointError(f"{self.path}: tensor {name} is stored in more than one shard")
                tensors[name] = tensor
        config = read_config(self.path)
        self.dropped = tied_duplicates(tensors, config)
        super().__init__({name: t for name, t in tensors.items() if name not in self.dropped}, config,
                         label=str(self.path))

    @property
    def directory(self) -> Path:
        return self.path

    def close(self) -> None:
        self._tensors.clear()

    def __repr__(self) -> str:
        return f"TorchBinSource({str(self.path)!r}, {len(self._tensors)} tensors in {len(self.files)} files)"
