"""PEFT LoRA export on every kind of layout, checked against PEFT's real ``merge_and_unload``: GPT-2's
transposed Conv1D (``fan_in_fan_out``), fused phi3 projections, MoE experts that transformers fuses into
3-D parameters (``target_parameters``), and encoders with the task type PEFT needs for the model class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.interop import export_lora
from s2reg.interop.peft_lora import task_type_of
from s2reg.tensors import CheckpointSource
from s2reg.train import PISAConfig, export_adapter, prepare_pisa

from ..families import zoo
from ..train.helpers import trained_zoo_adapter, zoo_base


def _peft_merged(name: str, base, lora) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    return PeftModel.from_pretrained(zoo.load(name, base), lora).merge_and_unload().state_dict()


def _assert_same_weights(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 rounding: PEFT adds ``B @ A`` in float32, s2reg the exact difference, which is
    float64 where float32 cannot hold it (FORMAT §4.3)."""
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize(("name", "task_type", "fan_in_fan_out"), [
    ("gpt2", "CAUSAL_LM", True),
    ("phi3", "CAUSAL_LM", False),
    ("mixtral", "CAUSAL_LM", False),
    ("qwen2_moe", "CAUSAL_LM", False),
    ("deepseek_v3", "CAUSAL_LM", False),
    ("gemma3", "CAUSAL_LM", False),
    ("bert", None, False),
    ("bert_model", "FEATURE_EXTRACTION", False),
])
def test_s2ft_lora_merges_in_peft_exactly_like_s2reg(tmp_path, name, task_type, fan_in_fan_out):
    base = zoo_base(name, tmp_path / "base")
    # deepseek_v3: MLA has no head-aligned projections (FFN channels only); gemma3: checkpoint names
    # (language_model.model.layers) differ from the modules transformers builds (model.language_model.layers)
    adapter, _ = trained_zoo_adapter(name, base, **({"heads": 0} if name == "deepseek_v3" else {}))
    adapter.save(tmp_path / "adapter")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "adapter"), "--to", "peft-lora", "--base", str(base),
                                       "-o", str(tmp_path / "lora"), "--json"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)["max_relative_error"]
    # one-hot factors are exact for F32 deltas; F64 ones (fp32 bases, FORMAT §4.3) are rounded to F32 factors
    wide = any(t.delta.dtype == np.float64 for t in adapter.targets.values())
    assert (0.0 < reported < 1e-6) if wide else reported == 0.0, reported
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["task_type"] == task_type and config["fan_in_fan_out"] is fan_in_fan_out
    if name in ("mixtral", "qwen2_moe", "deepseek_v3"):
        assert any(p.endswith("experts.gate_up_proj") for p in config["target_parameters"])
    s2reg.merge(base, [adapter], tmp_path / "merged")
    ours = zoo.load(name, tmp_path / "merged").state_dict()
    _assert_same_weights(_peft_merged(name, base, tmp_path / "lora"), ours)
    assert any(not torch.equal(t, zoo.load(name, base).state_dict()[k]) for k, t in ours.items())


def test_pisa_on_conv1d_exports_transposed_through_the_svd(tmp_path):
    base = zoo_base("gpt2", tmp_path / "base")
    model = zoo.load("gpt2", base)
    prepared = prepare_pisa(model, PISAConfig(block=16, coefficients=3, targets=("c_attn",)))
    with torch.no_grad():
        for p in prepared.parameters.values():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    with CheckpointSource(base) as source:
        adapter = export_adapter(model, base=source)
    report = export_lora(adapter, tmp_path / "lora", rank=64, base=base)
    assert report.fan_in_fan_out is True and report.max_relative_error < 1e-5
    s2reg.merge(base, [adapter], tmp_path / "merged")
    ours = zoo.load("gpt2", tmp_path / "merged").state_dict()
    theirs = _peft_merged("gpt2", base, tmp_path / "lora")
    for key, value in ours.items():
        torch.testing.assert_close(theirs[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_task_type_follows_the_saved_model_class():
    cases = {"LlamaForCausalLM": "CAUSAL_LM", "BertModel": "FEATURE_EXTRACTION", "BertForMaskedLM": None,
             "BertForSequenceClassification": "SEQ_CLS", "BertForTokenClassification": "TOKEN_CLS",
             "Gemma3ForConditionalGeneration": "CAUSAL_LM", "GPT2LMHeadModel": "CAUSAL_LM", "NoSuchModel": None}
    for architecture, task in cases.items():
        assert task_type_of({"model_type": "x", "architectures": [architecture]}) == task
    from peft import TaskType

    assert {t for t in cases.values() if t} <= {t.value for t in TaskType}
