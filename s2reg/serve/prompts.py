"""Text in, text out: prompts under several adapters in one mixed batch (what ``s2reg generate`` runs).

Prompts are tokenised as given unless ``chat`` asks for the tokenizer's chat template, so a result
can be reproduced; decoding is greedy. Each result is the generated continuation only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import S2RegError
from .server import AdapterServer


@dataclass(frozen=True)
class Completion:
    """One prompt's continuation under one adapter (``adapter`` None: the base)."""

    prompt: str
    adapter: str | None
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "adapter": self.adapter, "text": self.text}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Completion:
        return cls(obj["prompt"], obj["adapter"], obj["text"])


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The ``"prompt"`` of every line of a JSONL file (blank lines skipped); a bad line is named by its number."""
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise S2RegError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise S2RegError(f"{path}:{number}: expected an object with a string \"prompt\"")
            prompts.append(record["prompt"])
    if not prompts:
        raise S2RegError(f"{path}: no prompts")
    return prompts


def prompt_text(tokenizer, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise S2RegError("--chat: this tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def encode(tokenizer, prompts: Sequence[str], *, chat: bool = False, device: torch.device | str = "cpu"):
    """``(input_ids, attention_mask)`` of ``prompts``, padded on the left (so continuations line up).

    A chat template already holds the special tokens it wants, so none are added on top of it.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    texts = [prompt_text(tokenizer, p, chat) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def complete(server: AdapterServer, tokenizer, prompts: Sequence[str], adapters: Sequence[str | None], *,
             max_new_tokens: int = 32, chat: bool = False, streamer=None) -> list[Completion]:
    """Every prompt under every adapter (None: the base), greedy, in one mixed batch; prompt-major order."""
    if not prompts or not adapters:
        raise S2RegError("nothing to generate: give at least one prompt and one adapter (or the base)")
    rows = [(p, a) for p in prompts for a in adapters]
    device = next(server.model.parameters()).device
    input_ids, attention_mask = encode(tokenizer, [p for p, _ in rows], chat=chat, device=device)
    output = server.generate(input_ids, attention_mask, adapters=[a for _, a in rows], max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, streamer=streamer)
    continuations = output[:, input_ids.shape[1]:]
    return [Completion(p, a, tokenizer.decode(c, skip_special_tokens=True)) for (p, a), c in zip(rows, continuations, strict=True)]
