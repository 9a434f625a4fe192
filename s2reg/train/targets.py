"""Which linear layers of a live model play which role (heads, kv groups, FFN channels).

Names come from ``s2reg.arch`` (Llama, Mistral, Qwen2, Gemma; the BERT encoder family), matched
against the model's own module names, so a model loaded with transformers is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..arch import ModelInfo, detect
from ..errors import S2RegError


@dataclass(frozen=True)
class ModelMap:
    info: ModelInfo
    modules: dict[tuple[str, int], tuple[str, nn.Linear]]  # (role, layer) -> (module name, module)

    def linear(self, role: str, layer: int) -> tuple[str, nn.Linear]:
        try:
            return self.modules[(role, layer)]
        except KeyError:
            raise S2RegError(f"the model has no {role} projection in layer {layer} ({self.info.arch.family})") from None


def map_model(model: nn.Module) -> ModelMap:
    """The role of every coupled linear layer; a clear error for an architecture s2reg does not know."""
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else config
    try:
        info = detect(config)
    except S2RegError as exc:
        raise S2RegError(f"{exc}; s2reg trains llama, mistral, qwen2, gemma and bert models out of the box, other "
                         "architectures with PISA on modules named by --targets") from None
    modules = {}
    for name, module in model.named_modules():
        found = info.arch.role_of(f"{name}.weight")
        if found and isinstance(module, nn.Linear):
            role, layer, _ = found
            modules[(role, layer)] = (name, module)
    if not modules:
        raise S2RegError(f"no {info.arch.family} projections found by name in the model; name modules with --targets")
    return ModelMap(info, modules)
