"""AdapterServer beyond the family table: attach from the registry, LRU residency, detach, base checks,
the PISA merge's rounding on a bf16 checkpoint, refused batches."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

import s2reg
from s2reg.cli import main
from s2reg.errors import BaseMismatch, S2RegError
from s2reg.registry import Store
from s2reg.serve import AdapterServer, NotAttached, TooManyAdapters
from s2reg.tensors import open_source

from ..families import zoo
from ..families.test_invariants import assert_same_logits, logits_of
from .builders import build_pisa, build_s2ft

NAME = "llama"


@pytest.fixture
def inputs():
    return {"input_ids": torch.randint(3, zoo.VOCAB - 3, (4, zoo.SEQ), generator=torch.Generator().manual_seed(2))}


@pytest.fixture
def adapters(zoo_checkpoint, tmp_path):
    """Three adapters of the llama row, saved, with the logits of each merged checkpoint."""
    base = zoo_checkpoint(NAME)
    built = {"a": build_s2ft(NAME, base, 7, [0]), "b": build_s2ft(NAME, base, 11, None), "p": build_pisa(NAME, base, 3)}
    for key, adapter in built.items():
        adapter.save(tmp_path / f"adapter-{key}")
        s2reg.merge(base, [adapter], tmp_path / f"merged-{key}")
    return base, {key: tmp_path / f"adapter-{key}" for key in built}


def merged_logits(tmp_path, key, inputs):
    return logits_of(zoo.load(NAME, tmp_path / f"merged-{key}"), inputs)


def test_attach_from_registry_and_path(adapters, inputs, tmp_path, monkeypatch):
    base, paths = adapters
    monkeypatch.setenv("S2REG_HOME", str(tmp_path / "store"))
    Store().push(paths["a"], "serve-a:v1")
    with AdapterServer(zoo.load(NAME, base), base) as server:
        server.attach("from-store", "serve-a:v1")
        server.attach("from-path", str(paths["p"]))
        out = server.forward(["from-store", "from-path", None, "from-store"], **inputs).logits
    for row, key in enumerate(["a", "p", None, "a"]):
        expected = logits_of(zoo.load(NAME, base), inputs) if key is None else merged_logits(tmp_path, key, inputs)
        assert_same_logits(out[row], expected[row])


def test_least_recently_used_adapter_gives_up_its_deltas(adapters, inputs, tmp_path):
    base, paths = adapters
    model = zoo.load(NAME, base)
    with AdapterServer(model, base, max_resident=2) as server:
        for key in ("a", "b", "p"):
            server.attach(key, str(paths[key]))
        assert server.attached == ["a", "b", "p"] and server.resident == ["b", "p"]
        assert set(server.memory()) == {"b", "p"}
        out = server.forward(["a", "b", "a", None], **inputs).logits  # "a" comes back, "p" (least recent) goes
        assert server.resident == ["a", "b"]
        for row, key in enumerate(["a", "b", "a"]):
            assert_same_logits(out[row], merged_logits(tmp_path, key, inputs)[row])
        with pytest.raises(TooManyAdapters, match="3 adapters, but at most 2"):
            server.forward(["a", "b", "p", None], **inputs)
        server.detach("a")
        with pytest.raises(NotAttached, match="no adapter is attached as 'a'"):
            server.forward(["a", None, None, None], **inputs)
        out = server.forward([None, "p", None, "b"], **inputs).logits
        assert_same_logits(out[1], merged_logits(tmp_path, "p", inputs)[1])
        assert_same_logits(out[0], logits_of(zoo.load(NAME, base), inputs)[0])
    assert not any(hasattr(m, "s2reg_served") for m in model.modules()), "a hook outlived its adapters"


def test_pisa_memory_is_a_dense_matrix_per_target(adapters):
    base, paths = adapters
    adapter = s2reg.load(paths["p"])
    with AdapterServer(zoo.load(NAME, base), base) as server:
        server.attach("p", adapter)
        server.attach("a", str(paths["a"]))
        memory = server.memory()
    assert memory["p"] == sum(4 * t.shape[0] * t.shape[1] for t in adapter.targets.values())  # fp32 out x in
    s2ft = s2reg.load(paths["a"])
    assert memory["a"] < 2 * sum(4 * t.delta.size + 8 * t.count for t in s2ft.targets.values())


def test_wrong_base_is_refused_in_one_line(adapters, tmp_path):
    base, paths = adapters
    other = tmp_path / "other"
    shutil.copytree(base, other)
    model = zoo.load(NAME, other)
    target = next(iter(s2reg.load(paths["a"]).targets))
    with torch.no_grad():
        model.get_parameter(target).mul_(1.5)
    model.save_pretrained(other)
    with AdapterServer(zoo.load(NAME, other), other) as server:
        with pytest.raises(BaseMismatch) as caught:
            server.attach("a", str(paths["a"]))
        assert server.attached == []
    message = str(caught.value)
    assert "\n" not in message and "'a'" in message and target in message and "differs" in message


def test_permuted_base_is_refused(adapters, tmp_path):
    base, paths = adapters
    result = CliRunner().invoke(main, ["permute", str(base), "--plan", str(paths["a"]), "-o", str(tmp_path / "permuted")])
    assert result.exit_code == 0, result.output
    with pytest.raises(S2RegError, match="s2reg unpermute"):
        AdapterServer(zoo.load(NAME, tmp_path / "permuted"), tmp_path / "permuted")


def test_batch_and_names_must_agree(adapters, inputs):
    base, paths = adapters
    with AdapterServer(zoo.load(NAME, base), base) as server:
        server.attach("a", str(paths["a"]))
        with pytest.raises(S2RegError, match="already attached"):
            server.attach("a", str(paths["b"]))
        with pytest.raises(S2RegError, match="give one per sequence"):
            server.forward(["a", None], **inputs)
        with pytest.raises(S2RegError, match="give one per sequence"):
            server.generate(inputs["input_ids"], adapters=["a"], max_new_tokens=1)


def test_pisa_on_bf16_checkpoint_carries_the_merge_rounding(tmp_path):
    """A bf16 checkpoint served in fp32: the PISA delta the server adds is cast_bf16(W + delta) - W, the merge's
    result, which differs from the raw reconstruction by more than the tolerance this test checks."""
    model = zoo.build_model(zoo.SPECIES[NAME]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    pisa = build_pisa(NAME, base, 5)
    s2ft = build_s2ft(NAME, base, 9, None)
    s2reg.merge(base, [pisa], tmp_path / "merged-p")
    s2reg.merge(base, [s2ft], tmp_path / "merged-s")
    inputs = {"input_ids": torch.randint(3, zoo.VOCAB - 3, (3, zoo.SEQ), generator=torch.Generator().manual_seed(4))}
    expected_p = logits_of(zoo.load(NAME, tmp_path / "merged-p"), inputs)
    expected_s = logits_of(zoo.load(NAME, tmp_path / "merged-s"), inputs)

    raw = zoo.load(NAME, base)  # the unrounded delta, added in fp32: not what the merged checkpoint computes
    with torch.no_grad():
        for name, target in pisa.targets.items():
            raw.get_parameter(name).add_(torch.from_numpy(target.to_dense()))
    scale = float(expected_p.abs().max())
    assert float((logits_of(raw, inputs) - expected_p).abs().max()) > 1e-4 * scale

    with AdapterServer(zoo.load(NAME, base), base) as server:
        server.attach("p", pisa)
        server.attach("s", s2ft)
        out = server.forward(["p", "s", None], **inputs).logits
    assert_same_logits(out[0], expected_p[0])
    assert_same_logits(out[1], expected_s[1])
    assert_same_logits(out[2], logits_of(zoo.load(NAME, base), inputs)[2])


def test_tied_weights_are_refused(zoo_checkpoint):
    """llama's row ties lm_head to the embeddings: a hook on one holder would miss the other, so it is refused."""
    base = zoo_checkpoint(NAME)
    with open_source(base) as source:
        tied = s2reg.S2FTAdapter.from_slices(
            source, {"model.embed_tokens.weight": ("rows", torch.tensor([5, 6]), torch.ones(2, 64) * 1e-2)},
            base_name=str(base))
    with AdapterServer(zoo.load(NAME, base), base) as server:
        with pytest.raises(S2RegError, match="tied weights"):
            server.attach("tied", tied)
        assert server.attached == []
