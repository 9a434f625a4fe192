"""What a model is trained to do: next-token prediction for decoders; masked-LM or sequence
classification for encoders (never a causal loss), chosen from the data.

Encoders (BERT, RoBERTa, DistilBERT ...) learn masked-LM from ``text`` records, or classification
from records with a ``label``. A classification head is not part of the base checkpoint and not part
of an adapter: it is created from a seed and stays frozen, so the adapter alone (on the same seed's
head) reproduces the trained model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import S2RegError

CAUSAL, MASKED, CLASSIFY = "causal-lm", "masked-lm", "sequence-classification"


@dataclass(frozen=True)
class Objective:
    kind: str
    labels: tuple[str, ...] = ()  # classification: the label names, in the order of their ids

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads a checkpoint for this objective."""
        return {CAUSAL: "AutoModelForCausalLM", MASKED: "AutoModelForMaskedLM",
                CLASSIFY: "AutoModelForSequenceClassification"}[self.kind]

    def label_id(self, label: Any) -> int:
        return self.labels.index(str(label))

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"kind": self.kind}
        if self.kind == CLASSIFY:
            found["labels"] = list(self.labels)
            found["head"] = "new, seeded, frozen (not part of the adapter)"
        return found


def _auto_names():
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES


def is_encoder(config: dict[str, Any] | None) -> bool:
    """A bidirectional text encoder (a masked-LM family), which must never get a causal next-token loss."""
    if not config or config.get("is_encoder_decoder"):
        return False
    return config.get("model_type") in _auto_names()[1]


def choose(config: dict[str, Any] | None, records: Sequence[dict[str, Any]]) -> Objective:
    """The objective for ``records`` on a model with ``config``."""
    labelled = sum("label" in r for r in records)
    if labelled and labelled != len(records):
        raise S2RegError(f"{labelled} of {len(records)} records have a label: label all of them (classification) or none")
    model_type = (config or {}).get("model_type")
    if is_encoder(config):
        if labelled:
            labels = tuple(sorted({str(r["label"]) for r in records}, key=_natural))
            if len(labels) < 2:
                raise S2RegError(f"classification needs at least two distinct labels; the data has only {labels[0]!r}")
            return Objective(CLASSIFY, labels)
        unusable = [k for k in ("prompt", "completion", "messages") if any(k in r for r in records)]
        if unusable:
            raise S2RegError(f"{model_type} is an encoder: it trains masked-LM on text (or input_ids) or "
                             f"classification on text + label, not on {unusable[0]} records")
        return Objective(MASKED)
    if model_type not in _auto_names()[0]:
        raise S2RegError(f"{model_type} is neither a causal LM nor a text encoder: s2reg train has no objective for it; "
                         "train it in Python with prepare_s2ft / prepare_pisa and export_adapter")
    if labelled:
        raise S2RegError("labelled records train encoders (sequence classification); this model is a decoder: "
                         "use text, prompt/completion, messages or input_ids")
    return Objective(CAUSAL)


def _natural(label: str) -> tuple:
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)
