"""Fine-tuning that produces s2reg adapters: S2FT with partial back-propagation, PISA with block-FFT deltas.

``prepare_s2ft(model, S2FTConfig(...))`` or ``prepare_pisa(model, PISAConfig(...))`` freezes a model
except the chosen slices or coefficients (ordinary ``nn.Parameter`` objects: use any optimizer),
``export_adapter(model)`` turns the result into a format-v1 adapter, and ``train(...)`` is the
ready-made loop behind ``s2reg train``. Heads and channels come from the model's family description
(``s2reg.arch``, checkpoint names and coordinates); ``layout`` finds each checkpoint tensor in the model
as transformers holds it (fused MoE experts, renamed modules), so adapters always name the checkpoint's
tensors. transformers is needed only to load models and tokenizers and to follow its load-time conversions.
"""

from .export import export_adapter
from .pisa.config import PISAConfig
from .pisa.model import PreparedPISA, prepare_pisa
from .s2ft.config import S2FTConfig
from .s2ft.model import PreparedS2FT, prepare_s2ft

__all__ = ["PISAConfig", "PreparedPISA", "PreparedS2FT", "S2FTConfig", "export_adapter", "prepare_pisa", "prepare_s2ft"]
