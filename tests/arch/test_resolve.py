"""Which description a checkpoint gets: model_type, then names and shapes; user files; clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from s2reg.arch import ARCH_FILE, ArchError, builtin_families, load_description, resolve, resolve_source
from s2reg.cli import main
from s2reg.tensors import open_source, save_state_dict


def config_and_shapes(directory):
    with open_source(directory) as source:
        return dict(source.config()), {n: tuple(source.shape(n)) for n in source.names()}


def test_every_builtin_description_loads_and_names_its_model_types():
    families = builtin_families()
    assert len({f.name for f in families}) == len(families) >= 30
    for family in families:
        assert family.roles and (family.model_types or family.extends)


def test_model_type_decides_and_names_and_prefix_are_found(zoo_checkpoint):
    config, shapes = config_and_shapes(zoo_checkpoint("gemma3_text"))
    info = resolve(config, shapes)
    assert (info.family.name, info.prefix, info.note) == ("gemma3_text", "model.", None)
    assert info.tensors("q", 1) == ["model.layers.1.self_attn.q_proj.weight"]
    config, shapes = config_and_shapes(zoo_checkpoint("gemma3"))  # the text tower of the multimodal model
    info = resolve(config, shapes)
    assert info.prefix == "language_model.model." and info.dims.layers == config["text_config"]["num_hidden_layers"]
    assert info.coupled("vision_tower.encoder.layers.0.self_attn.q_proj.weight") is None


@pytest.mark.parametrize("name", ["bert", "bert_model"])
def test_bert_with_and_without_its_prefix(name, zoo_checkpoint):
    config, shapes = config_and_shapes(zoo_checkpoint(name))
    info = resolve(config, shapes)
    assert info.prefix == ("bert." if name == "bert" else "")
    (q,) = info.tensors("q", 0)
    assert q == info.prefix + "encoder.layer.0.attention.self.query.weight"
    with pytest.raises(ArchError, match=r"bert has no 'gate' projection \(its roles: q, k, v, o, up, down\)"):
        info.require_roles(["q", "gate"])


def test_unknown_model_type_with_llama_names_works_with_a_note(zoo_checkpoint):
    config, shapes = config_and_shapes(zoo_checkpoint("llama"))
    config["model_type"] = "my-llama-finetune"
    info = resolve(config, shapes)
    assert info.family.name == "llama"
    assert info.note == "unknown model_type 'my-llama-finetune': assumed the llama layout from tensor names"
    # without the "model." prefix too
    bare = {n.removeprefix("model."): s for n, s in shapes.items()}
    assert resolve(config, bare).prefix == ""


def test_names_tell_apart_layouts_that_share_names(zoo_checkpoint):
    """OLMo 2's q_norm spans all heads (it moves with them); Qwen 3's is per head_dim (it does not)."""
    for species, moves in (("olmo2", True), ("qwen3", False)):
        config, shapes = config_and_shapes(zoo_checkpoint(species))
        config["model_type"] = "unlisted"
        info = resolve(config, shapes)
        assert (info.coupled("model.layers.0.self_attn.q_norm.weight") is not None) == moves, species


def test_unknown_layout_is_one_line_naming_the_arch_format():
    config = {"model_type": "rwkv", "num_hidden_layers": 2, "hidden_size": 8}
    with pytest.raises(ArchError) as error:
        resolve(config, {"blocks.0.att.key.weight": (8, 8), "blocks.0.ffn.value.weight": (8, 32)})
    message = str(error.value)
    assert "\n" not in message and "--arch FILE" in message and "docs/families.md" in message
    assert "'blocks.0.att.key.weight'" in message and ARCH_FILE in message


def test_no_config_is_refused_without_pointing_at_a_missing_flag():
    with pytest.raises(ArchError, match="has no config.json") as error:
        resolve(None, {"model.layers.0.self_attn.q_proj.weight": (8, 8)})
    assert "--targets" not in str(error.value)


MY_FAMILY = {
    "format": "s2reg.arch", "version": 1, "name": "mymodel", "model_types": ["mymodel"],
    "layers": "blocks.{layer}", "prefix": "",
    "dims": {"layers": "n_layers", "hidden": "d_model", "heads": "n_heads", "kv_heads": "=heads",
             "head_dim": "=hidden/heads", "intermediate": "=4*hidden", "experts": 0},
    "tensors": {"attn.wqkv": {"out": {"parts": ["q", "k", "v"], "layout": "grouped"}}, "attn.wo": {"in": "o"},
                "ffn.w_in": {"out": "up"}, "ffn.w_out": {"in": "down"}},
}


def my_checkpoint(tmp_path, with_file_beside=False):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for key, shape in (("attn.wqkv", (48, 16)), ("attn.wo", (16, 16)), ("ffn.w_in", (64, 16)), ("ffn.w_out", (16, 64))):
            tensors[f"blocks.{layer}.{key}.weight"] = torch.randn(shape, generator=g)
    config = {"model_type": "mymodel", "n_layers": 2, "d_model": 16, "n_heads": 4}
    extra = {"config.json": json.dumps(config).encode()}
    if with_file_beside:
        extra[ARCH_FILE] = json.dumps(MY_FAMILY).encode()
    return save_state_dict(tmp_path / "mine", tensors, extra_files=extra), config


def test_a_user_description_file_beside_the_checkpoint_or_passed_with_arch(tmp_path):
    directory, config = my_checkpoint(tmp_path, with_file_beside=True)
    with open_source(directory) as source:
        info = resolve_source(source)
    assert info.family.name == "mymodel" and info.family.source.endswith(ARCH_FILE)
    assert info.unit_indices("blocks.1.attn.wqkv.weight", "k", [2]).tolist() == list(range(2 * 12 + 4, 2 * 12 + 8))
    (tmp_path / "desc.json").write_text(json.dumps(MY_FAMILY))
    (directory / ARCH_FILE).unlink()
    with open_source(directory) as source:
        with pytest.raises(ArchError, match="unknown layout"):
            resolve_source(source)
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps({"heads": {"1": [3]}, "channels": {"0": [60]}}))
    run = CliRunner().invoke
    out = run(main, ["permute", str(directory), "--plan", str(selection), "--arch", str(tmp_path / "desc.json"),
                     "-o", str(tmp_path / "p"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["tensors_changed"] == 4  # wqkv + wo of layer 1, w_in + w_out of layer 0
    assert (tmp_path / "p" / ARCH_FILE).is_file()  # recorded: unpermute and merge need no --arch
    back = run(main, ["unpermute", str(tmp_path / "p"), "-o", str(tmp_path / "b")])
    assert back.exit_code == 0, back.output


BAD = [
    ({"tensors": {"attn.wo": {"in": "q"}}}, "tensors['attn.wo'].in: role 'q' cannot sit here"),
    ({"tensors": {"attn.wo": {"out": "o"}}}, "tensors['attn.wo'].out: role 'o' cannot sit here"),
    ({"tensors": {"attn.wo": {"in": "o", "out": "q"}}}, "give exactly one of 'out', 'in' or 'follows'"),
    ({"tensors": {"attn.wo": {"in": "o", "transpose": True}}}, "unknown key 'transpose'"),
    ({"tensors": {"attn.wqkv": {"out": {"parts": ["q", "k"], "layout": "zigzag"}}}}, "'layout' must be one of concat, grouped"),
    ({"dims": {"heads": "n_heads", "depth": 3}}, "unknown dimension 'depth'"),
    ({"layers": "blocks"}, "'layers' must contain {layer} once"),
    ({"name": 7}, "'name' must be str"),
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"tensors": {"attn.{head}.wo": {"in": "o"}}}, "the only placeholder is {expert}"),
    ({"tensors": {"ffn.{expert}.w_out": {"in": "down", "stacked": True}}}, "a 'stacked' tensor holds every expert"),
    ({"tensors": {"ffn.w_out": {"in": "down", "stacked": "yes"}}}, "'stacked' must be bool"),
    ({"tensors": {"ffn.bias": {"follows": "down", "stacked": True}}}, "role 'down' cannot sit here"),
]


@pytest.mark.parametrize(("change", "expected"), BAD)
def test_invalid_user_files_get_one_line_errors_naming_the_key(tmp_path, change, expected):
    data = json.loads(json.dumps(MY_FAMILY))
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ArchError) as error:
        load_description(path)
    message = str(error.value)
    assert expected in message and "docs/families.md" in message and "\n" not in message and str(path) in message


def test_a_user_file_that_does_not_fit_the_checkpoint_names_the_tensor(tmp_path):
    directory, config = my_checkpoint(tmp_path)
    wrong = json.loads(json.dumps(MY_FAMILY))
    wrong["dims"]["heads"] = 3  # 16 is not 3 heads of 16/3
    (tmp_path / "wrong.json").write_text(json.dumps({**wrong, "dims": {**wrong["dims"], "head_dim": 4}}))
    with open_source(directory) as source:
        with pytest.raises(ArchError, match=r"blocks\.0\.attn\.\w+\.weight: length \d+, but .* of 3 heads"):
            resolve_source(source, tmp_path / "wrong.json")


def test_not_json_is_a_clear_error(tmp_path):
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(ArchError, match="not valid JSON"):
        load_description(tmp_path / "x.json")


def test_every_json_example_in_docs_families_md_is_a_valid_description(tmp_path):
    from pathlib import Path
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "families.md").read_text()
    examples = re.findall(r"```json\n(.+?)\n```", text, flags=re.S)
    full = [e for e in examples if '"format"' in e]
    assert len(full) == 5  # Phi-3, GPT-2, Mixtral, gpt-oss, a user's family
    builtin = {f.name: f for f in builtin_families()}
    for i, example in enumerate(full):
        (tmp_path / f"{i}.json").write_text(example)
        family = load_description(tmp_path / f"{i}.json")
        if family.name in builtin:  # the documented built-ins are the real ones
            assert set(family.tensors) == set(builtin[family.name].tensors) and family.dims == builtin[family.name].dims
