"""Fine-tuning that produces s2reg adapters: S2FT with partial back-propagation, PISA with block-FFT deltas.

``prepare_s2ft(model, S2FTConfig(...))`` or ``prepare_pisa(model, PISAConfig(...))`` freezes a model
except the chosen slices or coefficients (ordinary ``nn.Parameter`` objects: use any optimizer),
``export_adapter(model)`` turns the result into a format-v1 adapter, and ``train(...)`` is the
ready-made loop behind ``s2reg train``; ``S2RegTrainerMixin`` trains a prepared model inside
transformers' ``Trainer`` and TRL's trainers (checkpoints of the slices, the adapter at the end).
Heads and channels come from the model's family description (``s2reg.arch``, checkpoint names and
coordinates); ``s2reg.arch.layout`` finds each checkpoint tensor in the model as transformers holds it (fused MoE
experts, renamed modules), so adapters always name the checkpoint's tensors. transformers is needed only
to load models and tokenizers and to follow its load-time conversions.
"""

from .._lazy import exports

# imported on first use: s2reg.train.settings and the configs stay importable without torch (s2reg train
# checks its options before importing it)
_EXPORTS = {
    "PISAConfig": ".pisa.config", "PreparedPISA": ".pisa.model", "PreparedS2FT": ".s2ft.model",
    "S2FTConfig": ".s2ft.config", "export_adapter": ".export", "prepare_pisa": ".pisa.model",
    "prepare_s2ft": ".s2ft.model", "S2RegTrainerMixin": ".hf_trainer",
}
__getattr__ = exports(__name__, _EXPORTS, globals())
__all__ = sorted(_EXPORTS)
