"""Every model family x the same invariants (issue 10), one table row per family of ``zoo.SPECIES``.

1. ``prepare_s2ft`` with heads and channels in every role the family has: the gradient of every trained
   slice equals the float64 autograd gradient of the full model restricted to it (the full gradient is
   saved through transformers' own ``save_pretrained``, so it is in checkpoint names and coordinates);
2. a few training steps lower the loss; export -> ``s2reg merge`` -> transformers load gives the
   trained model's logits; ``unmerge`` restores every tensor's sha256;
3. ``s2reg permute --plan`` keeps logits, ``unpermute`` restores every bit, and the adapter merged into
   the permuted checkpoint gives the logits of the adapter merged into the base;
4. ``extract --detect-permutation`` on a co-permuted fine-tuned checkpoint (the permuted merge without
   its permutation record, as the official S2FT code leaves it) returns the adapter in original
   coordinates: merged into the base it reproduces the merged base bit for bit;
5. ``export --to peft-lora`` loads in PEFT and ``merge_and_unload`` equals s2reg's merge;
6. PISA trains on the family's projections and merges to the trained model's logits;
7. ``s2reg.apply`` on the live base model (transformers' own layout: fused experts, model prefixes) gives
   the merged checkpoint's weights and logits bit for bit; ``s2reg.remove`` gives back every bit of the base.

Every invariant trains layer 0, where the zoo puts ``-0.0`` entries into every projection: trained
slices cross them, and merge, unmerge and permutation must carry them bit for bit (FORMAT §4.3
restore lists). Layer 1 stays untouched (in DeepSeek V3 the dense FFN layer is trained, its MoE layer not).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.arch import CHANNEL_ROLES, HEAD_ROLES, resolve_source
from s2reg.cli import main
from s2reg.format import S2FTAdapter
from s2reg.format.s2ft import take
from s2reg.tensors import open_source
from s2reg.train import PISAConfig, S2FTConfig, export_adapter, prepare_pisa, prepare_s2ft

from . import zoo

# one xdist group per family: with ``-n 2 --dist loadgroup`` a row's tests share its trained adapter
ROWS = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in zoo.NAMES]
ROLE_ORDER = ("q", "k", "v", "o", "up", "gate", "down")
TRAINED_LAYER = 0


# -- helpers ------------------------------------------------------------------------------------------
def cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, f"s2reg {' '.join(map(str, args))}: {result.output}{result.exception!r}"
    return result.output


def info_of(directory: Path):
    with open_source(directory) as source:
        return resolve_source(source)


def shas(directory: Path) -> dict[str, str]:
    with open_source(directory) as source:
        return {name: source.sha256_of(name) for name in source.names()}


def loss_of(species: zoo.Species, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if species.objective in ("causal", "masked"):
        return model(**inputs, labels=inputs["input_ids"]).loss
    if species.objective == "classify":
        return model(**inputs, labels=torch.arange(zoo.BATCH) % model.config.num_labels).loss
    # a bare encoder: regress its (layer-normed) states onto a fixed random target
    states = zoo.outputs(model, inputs)
    target = torch.randn(states.shape, generator=torch.Generator().manual_seed(5), dtype=states.dtype)
    return torch.nn.functional.mse_loss(states, target)


def load64(species: zoo.Species, directory: Path, info):
    """A float64 copy (transformers' grouped-matmul MoE kernels take no float64: experts run eager)."""
    extra = {"experts_implementation": "eager"} if info.dims.experts else {}
    return species.cls.from_pretrained(directory, dtype=torch.float64, **extra).eval()


def logits_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return zoo.outputs(model, inputs).detach().clone()


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def s2ft_config(info, layers: list[int] | None, *, witnessed: bool = False) -> S2FTConfig:
    """Heads and channels in every role the family has; ``witnessed``: only the roles the official
    S2FT code trains (v, o, up, down; down alone without a gate), so every unit keeps untouched rows
    that reveal a co-permutation."""
    roles = tuple(r for r in ROLE_ORDER if r in info.roles)
    if witnessed:
        keep = {"v", "o", "down"} | ({"up"} if "gate" in info.roles else set())
        roles = tuple(r for r in roles if r in keep)
    heads = 1 if set(roles) & set(HEAD_ROLES) else 0
    channels = 2 if set(roles) & set(CHANNEL_ROLES) else 0
    return S2FTConfig(heads=heads, channels=channels, roles=roles, layers=layers, seed=7)


def pisa_config(species: zoo.Species) -> PISAConfig:
    """The trainer's default targets (every projection that is a matmul layer of its own), small blocks."""
    return PISAConfig(block=16, coefficients=4, layers=[TRAINED_LAYER], seed=3)


def train(species, model, parameters, inputs, steps: int = 3, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(species, model, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    losses.append(float(loss_of(species, model, inputs)))
    return losses


def copy_without_record(directory: Path, out: Path) -> Path:
    shutil.copytree(directory, out)
    (out / "s2reg-permutation.json").unlink()
    return out


# -- the trained adapter of a row, shared by invariants 2-5 ------------------------------------------------
@dataclass
class Trained:
    base: Path
    adapter: Path
    merged: Path
    losses: list[float]
    logits: torch.Tensor  # of the trained model in memory
    inputs: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def trained_row(zoo_checkpoint, tmp_path_factory):
    cache: dict[tuple[str, bool], Trained] = {}

    def get(name: str, witnessed: bool = False) -> Trained:
        if (name, witnessed) not in cache:
            species = zoo.SPECIES[name]
            base = zoo_checkpoint(name)
            work = tmp_path_factory.mktemp(f"{name}-s2ft")
            inputs = zoo.example_inputs(species)
            model = zoo.load(species, base)
            prepared = prepare_s2ft(model, s2ft_config(info_of(base), [TRAINED_LAYER], witnessed=witnessed))
            losses = train(species, model, list(prepared.parameters.values()), inputs)
            logits = logits_of(model, inputs)
            with open_source(base) as source:
                export_adapter(model, base=source, base_name=str(base)).save(work / "adapter")
            cli("merge", base, work / "adapter", "-o", work / "merged")
            cache[name, witnessed] = Trained(base, work / "adapter", work / "merged", losses, logits, inputs)
        return cache[name, witnessed]

    return get


# -- invariant 1 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROWS)
def test_1_slice_gradients_equal_float64_autograd(name, zoo_checkpoint, tmp_path):
    species = zoo.SPECIES[name]
    base32 = zoo_checkpoint(name)
    zoo.load(species, base32).double().save_pretrained(tmp_path / "base64")
    inputs = zoo.example_inputs(species)
    info = info_of(tmp_path / "base64")

    reference = load64(species, tmp_path / "base64", info)
    loss_of(species, reference, inputs).backward()
    with torch.no_grad():
        for param in reference.parameters():
            param.data = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
    reference.save_pretrained(tmp_path / "grads")  # transformers' own layout conversion, checkpoint coordinates

    model = load64(species, tmp_path / "base64", info)
    config = s2ft_config(info, [TRAINED_LAYER])
    prepared = prepare_s2ft(model, config)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(prepared.parameters)
    loss_of(species, model, inputs).backward()
    roles_seen = set()
    with open_source(tmp_path / "grads") as grads:
        for trained in prepared.slices.values():
            roles_seen |= set(trained.roles)
            expected = torch.from_numpy(take(grads.array(trained.name), trained.axis, trained.indices)).reshape(-1)
            assert expected.abs().max() > 0, f"{trained.name}: the reference gradient of the slice is zero"
            grad = prepared.parameters[trained.parameter].grad.reshape(-1)
            if trained.offset is not None:  # several tensors' slices in one trainable vector
                grad = grad[trained.offset: trained.offset + expected.numel()]
            torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-14, msg=lambda m, n=trained.name: f"{n}: {m}")
            assert info.coupled(trained.name) is None or info.coupled(trained.name).layer == TRAINED_LAYER
    assert roles_seen == set(config.roles), f"trained roles {sorted(roles_seen)}, asked for {config.roles}"


# -- invariant 2 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROWS)
def test_2_export_merge_load_unmerge(name, trained_row, tmp_path):
    row = trained_row(name)
    assert row.losses[-1] < row.losses[0], f"loss did not go down: {row.losses}"
    merged = zoo.load(name, row.merged)
    assert_same_logits(logits_of(merged, row.inputs), row.logits, rtol=1e-6)
    base_shas, merged_shas = shas(row.base), shas(row.merged)
    adapter = s2reg.load(row.adapter)
    targets = set(adapter.targets)
    # the trained slices cross the zoo's -0.0 entries: unmerge needs restore lists (FORMAT §4.3) to give them back
    assert any(getattr(t, "restore", None) is not None for t in adapter.targets.values())
    assert {n for n in base_shas if base_shas[n] != merged_shas[n]} <= targets and targets
    assert {n for n in base_shas if base_shas[n] == merged_shas[n]} >= set(base_shas) - targets
    cli("unmerge", row.merged, row.adapter, "-o", tmp_path / "restored")
    assert shas(tmp_path / "restored") == base_shas


# -- invariant 3 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROWS)
def test_3_permute_keeps_logits_and_unpermute_every_bit(name, trained_row, tmp_path):
    row = trained_row(name)
    species = zoo.SPECIES[name]
    cli("permute", row.base, "--plan", row.adapter, "-o", tmp_path / "permuted")
    base_shas = shas(row.base)
    assert shas(tmp_path / "permuted") != base_shas, "permute changed no tensor"
    assert_same_logits(logits_of(zoo.load(species, tmp_path / "permuted"), row.inputs),
                       logits_of(zoo.load(species, row.base), row.inputs))
    cli("unpermute", tmp_path / "permuted", "-o", tmp_path / "unpermuted")
    assert shas(tmp_path / "unpermuted") == base_shas
    cli("merge", tmp_path / "permuted", row.adapter, "-o", tmp_path / "permuted-merged")
    assert_same_logits(logits_of(zoo.load(species, tmp_path / "permuted-merged"), row.inputs),
                       logits_of(zoo.load(species, row.merged), row.inputs))


# -- invariant 4 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROWS)
def test_4_extract_detects_the_co_permutation(name, trained_row, tmp_path):
    row = trained_row(name, witnessed=True)
    cli("permute", row.base, "--plan", row.adapter, "-o", tmp_path / "permuted")
    cli("merge", tmp_path / "permuted", row.adapter, "-o", tmp_path / "permuted-merged")
    tuned = copy_without_record(tmp_path / "permuted-merged", tmp_path / "co-permuted-tuned")
    cli("extract", row.base, tuned, "--detect-permutation", "-o", tmp_path / "extracted")
    cli("merge", row.base, tmp_path / "extracted", "-o", tmp_path / "remerged")
    assert shas(tmp_path / "remerged") == shas(row.merged)


# -- invariant 5 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROWS)
def test_5_peft_lora_export_merges_like_s2reg(name, trained_row, tmp_path):
    from peft import PeftModel

    row = trained_row(name)
    species = zoo.SPECIES[name]
    adapter, merged = row.adapter, row.merged
    refused = CliRunner().invoke(main, ["export", str(adapter), "--to", "peft-lora", "--base", str(row.base),
                                        "-o", str(tmp_path / "lora")])
    if refused.exit_code != 0:
        # PEFT has no LoRA layer for experts that transformers fuses into 3-D parameters: a one-line refusal
        # naming such a tensor, and the rest of the adapter must still export exactly
        info = info_of(row.base)
        fused = {n for n in s2reg.load(adapter).targets if (c := info.coupled(n)) and c.expert not in (None, "shared")}
        message = refused.output.strip()
        assert refused.exit_code == 1 and message.startswith("Error: ") and "\n" not in message, refused.output
        assert fused and any(n in message for n in fused), f"refused, but not for a fused expert: {message}"
        whole = s2reg.load(adapter)
        rest = {n: t for n, t in whole.targets.items() if n not in fused}
        assert rest, "nothing PEFT can hold was trained"
        S2FTAdapter(rest, whole.base, params=whole.params).save(tmp_path / "rest")
        adapter, merged = tmp_path / "rest", tmp_path / "rest-merged"
        cli("merge", row.base, adapter, "-o", merged)
        cli("export", adapter, "--to", "peft-lora", "--base", row.base, "-o", tmp_path / "lora")
    peft_model = PeftModel.from_pretrained(zoo.load(species, row.base), tmp_path / "lora")
    by_peft = peft_model.merge_and_unload().state_dict()
    by_s2reg = zoo.load(species, merged).state_dict()
    assert by_peft.keys() == by_s2reg.keys()
    for key, value in by_s2reg.items():
        torch.testing.assert_close(by_peft[key], value, rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


# -- invariant 6 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ROWS)
def test_6_pisa_trains_and_merges(name, zoo_checkpoint, tmp_path):
    species = zoo.SPECIES[name]
    base = zoo_checkpoint(name)
    inputs = zoo.example_inputs(species)
    model = zoo.load(species, base)
    prepared = prepare_pisa(model, pisa_config(species))
    losses = train(species, model, list(prepared.parameters.values()), inputs, lr=5e-2)
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    with open_source(base) as source:
        export_adapter(model, base=source, base_name=str(base)).save(tmp_path / "pisa")
    cli("merge", base, tmp_path / "pisa", "-o", tmp_path / "merged")
    assert_same_logits(logits_of(zoo.load(species, tmp_path / "merged"), inputs), logits_of(model, inputs), rtol=1e-4)


# -- beyond the table ---------------------------------------------------------------------------------------------
def test_pisa_targets_accept_short_and_full_module_names(zoo_checkpoint, tmp_path):
    base = zoo_checkpoint("gemma3_text")
    data = tmp_path / "data.jsonl"
    ids = zoo.example_inputs("gemma3_text")["input_ids"].tolist()
    data.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids))
    common = ["train", "--base", base, "--data", data, "--method", "pisa", "--block", "16", "--coefficients", "4",
              "--max-steps", "2", "--batch-size", "2", "--device", "cpu"]
    cli(*common, "--targets", "q_proj,v_proj", "-o", tmp_path / "short")
    short = set(s2reg.load(tmp_path / "short").targets)
    assert short == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    cli(*common, "--targets", "model.layers.1.self_attn.q_proj", "-o", tmp_path / "full")
    full = s2reg.load(tmp_path / "full").targets
    assert set(full) == {"model.layers.1.self_attn.q_proj.weight"}


def test_unknown_model_type_with_llama_names_is_read_as_llama(zoo_checkpoint, trained_row, tmp_path):
    row = trained_row("llama")
    strange = tmp_path / "strange"
    shutil.copytree(row.base, strange)
    config = json.loads((strange / "config.json").read_text())
    config["model_type"] = "mystery_lm"
    config["architectures"] = ["MysteryForCausalLM"]
    (strange / "config.json").write_text(json.dumps(config))
    info = info_of(strange)
    assert info.note and "mystery_lm" in info.note and "llama" in info.note
    assert info.roles == info_of(row.base).roles and info.dims == info_of(row.base).dims
    cli("permute", strange, "--plan", row.adapter, "-o", tmp_path / "permuted")
    assert shas(tmp_path / "permuted") != shas(strange)
    cli("unpermute", tmp_path / "permuted", "-o", tmp_path / "unpermuted")
    assert shas(tmp_path / "unpermuted") == shas(strange)
    cli("merge", strange, row.adapter, "-o", tmp_path / "merged")  # the fingerprints are of tensors, not names
    assert shas(tmp_path / "merged") == shas(row.merged)


# -- invariant 7 ----------------------------------------------------------------------------------------------
def bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("name", ROWS)
def test_7_live_apply_equals_the_merged_checkpoint_and_remove_restores_every_bit(name, trained_row):
    row = trained_row(name)
    species = zoo.SPECIES[name]
    model, merged = zoo.load(species, row.base), zoo.load(species, row.merged)
    base_bits = {n: bits(t) for n, t in model.state_dict().items()}
    adapter = s2reg.load(row.adapter)
    s2reg.apply(model, adapter)
    merged_state = merged.state_dict()
    changed = {n for n, t in model.state_dict().items() if bits(t) != base_bits[n]}
    assert changed and all(bits(model.state_dict()[n]) == bits(merged_state[n]) for n in base_bits)
    assert torch.equal(logits_of(model, row.inputs), logits_of(merged, row.inputs))
    s2reg.remove(model, adapter)
    assert {n: bits(t) for n, t in model.state_dict().items()} == base_bits
