"""``--budget N``: the heads and channels chosen train at most N parameters, and one more unit would pass N.

Counts are those of the real preparation (``prepare_s2ft(...).num_trainable``), not the budget's own
arithmetic, on tiny models of several families: grouped-query attention (llama), multi-query
(falcon_mq), fused q/k/v and gate/up (phi3), an interleaved fused qkv (gpt_neox) and mixture-of-experts
FFNs with and without a shared expert (mixtral, qwen2_moe); a channel budget on every row of the families
table (gpt-oss's stacked experts included).
"""

from __future__ import annotations

import copy
import json

import pytest
from click.testing import CliRunner

from s2reg.cli import main
from s2reg.errors import S2RegError
from s2reg.train import S2FTConfig, prepare_s2ft
from s2reg.train.budget import HEAD_SHARE, fit_budget

from ..families import zoo

FAMILIES = ["llama", "falcon_mq", "phi3", "gpt_neox", "mixtral", "qwen2_moe"]
ROLE_SETS = [None, ("o", "down"), ("q", "o", "up", "down")]


@pytest.fixture(scope="module")
def models():
    return {name: zoo.build_model(zoo.SPECIES[name]) for name in FAMILIES}


def trained(model, config: S2FTConfig) -> int:
    return prepare_s2ft(copy.deepcopy(model), config).num_trainable


def available(model) -> tuple[int, int]:
    """Query heads per layer, and the fewest FFN channels any layer (expert) has."""
    from s2reg.train.targets import map_model

    mapping = map_model(model)
    fewest = min(mapping.info.channel_count(layer, e) for layer in range(mapping.info.dims.layers)
                 for e in mapping.info.experts(layer))
    return mapping.info.dims.heads, fewest


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("roles", ROLE_SETS, ids=lambda r: "default" if r is None else "+".join(r))
@pytest.mark.parametrize("share", [0.05, 0.3, 0.8])
def test_the_budget_is_filled_but_never_passed(models, family, roles, share):
    model = models[family]
    everything = trained(model, S2FTConfig(channels=available(model)[1], heads=available(model)[0],
                                           roles=roles or ("down",)))
    budget = int(everything * share)
    config = fit_budget(model, budget, S2FTConfig(roles=roles))
    count = trained(model, config)
    assert 0 < count <= budget
    heads, channels = available(model)
    if config.channels and config.channels < channels:  # one more channel would not fit
        assert trained(model, S2FTConfig(channels=config.channels + 1, heads=config.heads, roles=config.roles)) > budget
    elif config.heads < heads and not config.channels:
        assert trained(model, S2FTConfig(channels=0, heads=config.heads + 1, roles=config.roles)) > budget
    if roles and set(roles) & {"o", "q"} and config.channels:  # heads take at most their share
        head_part = count - trained(model, S2FTConfig(channels=config.channels, heads=0, roles=config.roles))
        assert head_part <= HEAD_SHARE * budget or config.channels == channels


@pytest.mark.parametrize("family", ["llama", "falcon_mq"])
def test_key_value_roles_stay_within_the_budget_under_grouped_query_attention(models, family):
    model = models[family]
    for budget in (3_000, 9_000, 20_000):
        config = fit_budget(model, budget, S2FTConfig(roles=("q", "k", "v", "down")))
        for seed in range(3):  # whichever heads are drawn, shared key/value heads only make it cheaper
            assert trained(model, S2FTConfig(channels=config.channels, heads=config.heads, roles=config.roles,
                                             seed=seed)) <= budget


def test_a_budget_below_one_unit_is_a_clear_error(models):
    with pytest.raises(S2RegError, match="below the cost of one unit"):
        fit_budget(models["llama"], 10, S2FTConfig())


def test_the_cli_reports_the_exact_count_the_budget_chose(tmp_path):
    from s2reg.synth import build_checkpoint

    base = build_checkpoint(tmp_path / "base", "llama")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": [3 + (i * 7 + j) % 200 for j in range(10)]}) + "\n" for i in range(8)))
    result = CliRunner().invoke(main, ["train", "--base", str(base), "--data", str(data), "--method", "s2ft", "--budget",
                                       "5000", "--roles", "o,down", "--max-steps", "1", "-o", str(tmp_path / "a"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # llama tiny: 2 layers, hidden 64, head_dim 16, FFN 128; a head in o costs 16 x 64, a channel in down 64
    assert summary["trainable_parameters"] == 2 * (summary["heads"] * 16 * 64 + summary["channels"] * 64) <= 5000
    assert summary["trainable_parameters"] > 5000 - 2 * 64
    both = CliRunner().invoke(main, ["train", "--base", str(base), "--data", str(data), "--method", "s2ft", "--budget",
                                     "5000", "--channels", "4", "-o", str(tmp_path / "b")])
    assert both.exit_code != 0 and "give one or the other" in both.output
    pisa = CliRunner().invoke(main, ["train", "--base", str(base), "--data", str(data), "--method", "pisa", "--budget",
                                     "5000", "-o", str(tmp_path / "c")])
    assert pisa.exit_code == 2 and "--budget sizes S2FT selections" in pisa.output


@pytest.mark.parametrize("family", sorted(zoo.SPECIES))
def test_every_family_s_channel_budget_is_never_passed(family):
    """Every row of the families table: a channel budget picks channels that train at most N parameters,
    and one more channel would pass N."""
    model = zoo.build_model(zoo.SPECIES[family])
    channels = available(model)[1]
    budget = int(trained(model, S2FTConfig(channels=channels, heads=0, roles=("down",))) * 0.4)
    config = fit_budget(model, budget, S2FTConfig(roles=("down",)))
    assert 0 < trained(model, config) <= budget
    assert config.channels == channels or trained(
        model, S2FTConfig(channels=config.channels + 1, heads=config.heads, roles=config.roles)) > budget
