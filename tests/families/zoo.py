"""Tiny random checkpoints of every model family, built from transformers' own configs.

Each :class:`Species` is one row of the families suite: a ``model_type`` handed to
``AutoConfig.for_model`` with small sizes (2 layers, 4+ heads, GQA kept where the family has
it, a few experts for MoE), the transformers class that builds and saves it, and how to feed it.
Builds are deterministic (seeded per species) and deliberately a little messy, as real
checkpoints are: ``-0.0`` entries in the layer-0 projections (every 7th element, so trained slices
cross them), tied embeddings where the family ties them, BERT saved both by ``BertModel`` (no ``bert.``
prefix) and by ``BertForMaskedLM``.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open

VOCAB = 128
SEQ = 12
BATCH = 2

# Small sizes shared by the decoder families; a species overrides what its config names differently.
_DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "attention_dropout": 0.0,
}
_ENCODER = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "initializer_range": 0.1,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "pad_token_id": 0,
}
_MOE = {"num_experts_per_tok": 2}
# Falcon derives head_dim and names its kv heads num_kv_heads.
_FALCON = {**{k: v for k, v in _DECODER.items() if k not in ("head_dim", "num_key_value_heads")},
           "ffn_hidden_size": 96, "hidden_dropout": 0.0}


@dataclass(frozen=True)
class Species:
    """One family row: how to build, save and run a tiny model of it."""

    name: str
    model_type: str
    model_class: str
    config: dict[str, Any] = field(default_factory=dict)
    inputs: str = "tokens"  # "tokens" (input_ids) or "pixels" (pixel_values)
    objective: str = "causal"  # "causal", "masked", "classify" (ViT) or "none" (a bare encoder, no head)
    notes: str = ""

    def make_config(self):
        return transformers.AutoConfig.for_model(self.model_type, **self.config)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode())

    @property
    def cls(self):
        return getattr(transformers, self.model_class)


def decoder(name: str, model_type: str, notes: str = "", **overrides) -> Species:
    """A causal-LM species with the shared small decoder sizes, ``overrides`` on top."""
    return Species(name, model_type, "AutoModelForCausalLM", {**_DECODER, **overrides}, notes=notes)


def _drop(config: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in keys}


_SPECIES = [
    decoder("llama", "llama", tie_word_embeddings=True, notes="tied embeddings (SmolLM2-like)"),
    decoder("mistral", "mistral", sliding_window=None),
    decoder("qwen2", "qwen2", notes="q/k/v biases"),
    decoder("qwen3", "qwen3", notes="per-head_dim q_norm/k_norm"),
    decoder("gemma", "gemma", hidden_act="gelu_pytorch_tanh"),
    decoder("gemma2", "gemma2", query_pre_attn_scalar=16, sliding_window=32),
    decoder("gemma3_text", "gemma3_text", query_pre_attn_scalar=16, sliding_window=32),
    Species(
        "gemma3",
        "gemma3",
        "Gemma3ForConditionalGeneration",
        {
            "text_config": {**_DECODER, "query_pre_attn_scalar": 16, "sliding_window": 32},
            "vision_config": {
                "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
                "image_size": 28, "patch_size": 14,
            },
            "mm_tokens_per_image": 4,
            "boi_token_index": VOCAB - 3,
            "eoi_token_index": VOCAB - 2,
            "image_token_index": VOCAB - 1,
            "initializer_range": 0.1,
        },
        notes="text tower of the multimodal model (SigLIP vision tower beside it)",
    ),
    decoder("olmo2", "olmo2", notes="q_norm/k_norm over all heads"),
    decoder("granite", "granite"),
    decoder("cohere", "cohere"),
    decoder("stablelm", "stablelm", use_qkv_bias=True, hidden_dropout=0.0),
    decoder("stablelm_qk_norm", "stablelm", notes="per-head q/k layernorm tensors: FFN channels only",
            qk_layernorm=True, hidden_dropout=0.0),
    decoder("smollm3", "smollm3"),
    decoder("glm4", "glm4"),
    decoder("ministral", "ministral", sliding_window=32),
    decoder("phi3", "phi3", notes="fused qkv_proj and gate_up_proj", resid_pdrop=0.0, embd_pdrop=0.0),
    decoder("phi", "phi", num_key_value_heads=4, resid_pdrop=0.0, embd_pdrop=0.0, notes="fc1/fc2, dense"),
    Species(
        "gpt2",
        "gpt2",
        "AutoModelForCausalLM",
        {
            "vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "initializer_range": 0.1,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        },
        notes="Conv1D [in, out], fused c_attn",
    ),
    decoder("gpt_neox", "gpt_neox", **{"hidden_dropout": 0.0}, notes="interleaved query_key_value"),
    Species("falcon", "falcon", "AutoModelForCausalLM",
            {**_FALCON, "new_decoder_architecture": True, "num_kv_heads": 2},
            notes="new decoder: query_key_value grouped per kv head"),
    Species("falcon_mq", "falcon", "AutoModelForCausalLM",
            {**_FALCON, "new_decoder_architecture": False, "multi_query": True},
            notes="falcon-7b layout: multi-query attention"),
    Species("falcon_mha", "falcon", "AutoModelForCausalLM",
            {**_FALCON, "new_decoder_architecture": False, "multi_query": False},
            notes="falcon-rw layout: multi-head attention, query_key_value interleaved per head"),
    decoder("starcoder2", "starcoder2", sliding_window=None, residual_dropout=0.0, embedding_dropout=0.0,
             notes="c_fc/c_proj, biases"),
    decoder("mixtral", "mixtral", **_MOE, num_local_experts=4, intermediate_size=48, sliding_window=None,
             router_jitter_noise=0.0),
    decoder("qwen2_moe", "qwen2_moe", **_MOE, num_experts=4, moe_intermediate_size=32,
             shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[], notes="shared expert"),
    decoder("qwen3_moe", "qwen3_moe", **_MOE, num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1,
             mlp_only_layers=[]),
    decoder("gpt_oss", "gpt_oss", **_MOE, num_local_experts=4, intermediate_size=48, sliding_window=32,
             notes="stacked experts [experts, in, out], gate/up interleaved; expert axes (FORMAT §4.5)"),
    decoder("deepseek_v3", "deepseek_v3", **_MOE, head_dim=8, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=32,
             kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
             first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4,
             notes="MLA attention (no head-aligned o_proj); layer 0 dense FFN, layer 1 MoE"),
    Species("bert", "bert", "BertForMaskedLM", dict(_ENCODER), objective="masked", notes="saved with the bert. prefix"),
    Species("bert_model", "bert", "BertModel", dict(_ENCODER), objective="none",
            notes="saved by BertModel: no bert. prefix"),
    Species("roberta", "roberta", "RobertaForMaskedLM", {**_ENCODER, "pad_token_id": 1, "max_position_embeddings": 66},
            objective="masked"),
    Species(
        "distilbert",
        "distilbert",
        "DistilBertForMaskedLM",
        {"vocab_size": VOCAB, "dim": 64, "hidden_dim": 96, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 64,
         "dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.1, "pad_token_id": 0},
        objective="masked",
    ),
    Species(
        "vit",
        "vit",
        "ViTForImageClassification",
        {**_drop(_ENCODER, "vocab_size", "max_position_embeddings", "pad_token_id"), "image_size": 32, "patch_size": 8,
         "num_labels": 3},
        inputs="pixels",
        objective="classify",
    ),
]
SPECIES: dict[str, Species] = {s.name: s for s in _SPECIES}
NAMES = list(SPECIES)


def _is_projection(name: str, tensor: torch.Tensor) -> bool:
    lowered = name.lower()
    return tensor.dim() >= 2 and ".0." in name and not any(k in lowered for k in ("embed", "norm", "wte", "wpe", "ln_"))


@torch.no_grad()
def build_model(species: Species) -> torch.nn.Module:
    """The species' model, freshly initialised from its seed, in eval mode, with -0.0 entries seeded."""
    torch.manual_seed(species.seed)
    config = species.make_config()
    model = species.cls.from_config(config) if species.model_class.startswith("Auto") else species.cls(config)
    model.eval()
    for name, param in model.named_parameters():
        if _is_projection(name, param) and param.reshape(-1, param.shape[-1]).shape[0] > 1:
            # signed zeros that byte-exact surgery must keep apart from +0.0 (as GGUF-dequantised
            # checkpoints have them): every 7th element, so every trained row or column slice crosses
            # some, and merge/unmerge must carry them bit for bit (FORMAT §4.3 restore lists)
            param.view(-1)[::7] = -0.0
    return model


def save_model(species: Species, model: torch.nn.Module, directory: str | Path) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)
    (directory / "s2reg-zoo.json").write_text(json.dumps({"species": species.name, "model_class": species.model_class}))
    return directory


def build(species: Species | str, directory: str | Path) -> Path:
    """Build and save one tiny checkpoint into ``directory`` (created); returns it."""
    species = SPECIES[species] if isinstance(species, str) else species
    return save_model(species, build_model(species), directory)


def load(species: Species | str, directory: str | Path) -> torch.nn.Module:
    """Load a checkpoint of this species with transformers (eval mode, float32)."""
    species = SPECIES[species] if isinstance(species, str) else species
    return species.cls.from_pretrained(directory, dtype=torch.float32).eval()


def example_inputs(species: Species | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic model inputs for this species (token ids avoid the special ids)."""
    species = SPECIES[species] if isinstance(species, str) else species
    generator = torch.Generator().manual_seed(seed)
    if species.inputs == "pixels":
        config = species.make_config()
        return {"pixel_values": torch.randn(BATCH, 3, config.image_size, config.image_size, generator=generator)}
    return {"input_ids": torch.randint(3, VOCAB - 3, (BATCH, SEQ), generator=generator)}


def word_tokenizer(directory: str | Path) -> None:
    """A WordLevel tokenizer over the zoo's 128 ids: [PAD] [UNK] [CLS] [SEP] [MASK] w5 .. w127."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(directory)


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tensor the invariants compare: logits where the model has a head, else the last hidden state."""
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def saved_tensors(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the checkpoint's safetensors files."""
    shapes = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes
