"""Training data from JSONL: ``text``, ``prompt``/``completion`` (loss on the completion only), chat
``messages`` (the tokenizer's chat template, loss on the last assistant turn), or pre-tokenised
``input_ids`` (optionally with ``labels``); for encoders ``text`` or ``input_ids`` with a ``label``
(classification), or without (masked-LM: a seeded 15% of the tokens masked once, BERT's 80/10/10
rule). Every malformed line is reported with its number.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import S2RegError
from .objective import CAUSAL, CLASSIFY, MASKED, Objective

if TYPE_CHECKING:
    import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]          # per token (-100: no loss); empty for classification
    label: int | None = None   # classification: the class id


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL file; S2RegError naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise S2RegError(f"{path}: no such data file")
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise S2RegError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.pos + 1})") from None
            if not isinstance(record, dict):
                raise S2RegError(f"{path}:{number}: expected a JSON object")
            _check(record, f"{path}:{number}")
            records.append(record)
    if not records:
        raise S2RegError(f"{path}: no examples")
    return records


def _check(record: dict[str, Any], where: str) -> None:
    if "label" in record:
        if not isinstance(record["label"], (int, str)) or isinstance(record["label"], bool):
            raise S2RegError(f"{where}: label must be an integer or a string")
        if "input_ids" not in record and not isinstance(record.get("text"), str):
            raise S2RegError(f"{where}: a labelled record needs text or input_ids")
    if "input_ids" in record:
        ids = record["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise S2RegError(f"{where}: input_ids must be a non-empty list of non-negative integers")
        labels = record.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) != len(ids)):
            raise S2RegError(f"{where}: labels must be a list as long as input_ids")
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise S2RegError(f"{where}: messages must be a list of {{role, content}} objects")
        if messages[-1]["role"] != "assistant":
            raise S2RegError(f"{where}: the last message must be the assistant's (it is what the model learns)")
    elif "prompt" in record or "completion" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise S2RegError(f"{where}: prompt and completion must both be strings")
    elif not isinstance(record.get("text"), str):
        raise S2RegError(f"{where}: expected one of text, prompt/completion, messages or input_ids")


def _needs_tokenizer(records: list[dict[str, Any]]) -> bool:
    return any("input_ids" not in r for r in records)


def tokenize(records: list[dict[str, Any]], tokenizer, max_length: int, objective: Objective = Objective(CAUSAL),
             *, seed: int = 0) -> list[Example]:
    """Token ids and labels (-100 where no loss is taken), truncated to ``max_length``."""
    if tokenizer is None and _needs_tokenizer(records):
        raise S2RegError("the base checkpoint has no tokenizer, so the data must be pre-tokenised (input_ids)")
    if objective.kind == CLASSIFY:
        return [Example(_ids(r, tokenizer)[:max_length], [], objective.label_id(r["label"])) for r in records]
    if objective.kind == MASKED:
        return _masked([_ids(r, tokenizer)[:max_length] for r in records], tokenizer, seed)
    examples = []
    for record in records:
        if "input_ids" in record:
            ids = record["input_ids"]
            labels = record.get("labels") or list(ids)
        elif "text" in record:
            ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
            labels = list(ids)
        else:
            if "messages" in record:
                messages = record["messages"]
                prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
                full = tokenizer.apply_chat_template(messages, tokenize=False)
                completion = full[len(prompt):] if full.startswith(prompt) else messages[-1]["content"]
            else:
                prompt, completion = record["prompt"], record["completion"]
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                completion_ids = completion_ids + [tokenizer.eos_token_id]
            ids = prompt_ids + completion_ids
            labels = [IGNORE] * len(prompt_ids) + completion_ids
        examples.append(Example(list(ids[:max_length]), list(labels[:max_length])))
    return examples


def _ids(record: dict[str, Any], tokenizer) -> list[int]:
    if "input_ids" in record:
        return list(record["input_ids"])
    return list(tokenizer(record["text"], add_special_tokens=True)["input_ids"])


MASK_SHARE = 0.15


def _masked(sequences: list[list[int]], tokenizer, seed: int) -> list[Example]:
    """Masked-LM examples: a seeded 15% of the ordinary tokens (at least one) chosen; of those, 80% become
    the mask token, 10% a random token, 10% stay; the loss is taken on the chosen ones only."""
    import torch  # here, not at import: reading and checking the data file runs before torch is loaded

    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise S2RegError("masked-LM needs the tokenizer's mask token: the base checkpoint has no tokenizer with one")
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for ids in sequences:
        ordinary = [i for i, t in enumerate(ids) if t not in special]
        if not ordinary:
            raise S2RegError("a masked-LM example has no ordinary tokens to mask")
        count = max(1, round(len(ordinary) * MASK_SHARE))
        chosen = [ordinary[j] for j in torch.randperm(len(ordinary), generator=generator)[:count].tolist()]
        inputs, labels = list(ids), [IGNORE] * len(ids)
        for position in chosen:
            labels[position] = ids[position]
            draw = float(torch.rand((), generator=generator))
            if draw < 0.8:
                inputs[position] = mask_id
            elif draw < 0.9:
                inputs[position] = int(torch.randint(vocab, (), generator=generator))
        examples.append(Example(inputs, labels))
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding takes no loss; one class id
    per example for classification)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        if e.label is None:
            labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    if examples[0].label is not None:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
