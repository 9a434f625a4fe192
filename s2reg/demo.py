"""The main job on embedded defaults: a tour of s2reg on a deterministic tiny Llama (GQA).

``s2reg demo`` builds the fixture model, makes an S2FT adapter (two attention heads and eight
FFN channels per layer) and a PISA adapter (16x16 blocks, 8 coefficients each) from known
deltas, saves, reloads and validates them against the base, shows what they hold, then merges
them into the base and takes them out again (new checkpoint and in place), checking that S2FT
comes back bit for bit; finally it trains an S2FT adapter disjoint from the first, pushes both to
a local registry, fuses them and merges the fusion: train -> push -> fuse -> merge.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import resolve_source
from .format import Adapter, PISAAdapter, S2FTAdapter, load
from .ops.describe import Description, describe
from .ops.fuse import fuse
from .registry import Store
from .results import Result
from .surgery import merge, merge_in_place, unmerge, unmerge_in_place
from .synth import build_checkpoint
from .tensors import CheckpointSource

Step = Callable[[str], None]


def known_s2ft(source: CheckpointSource, seed: int = 0) -> S2FTAdapter:
    """Heads 0 and 2 of every layer (q rows, o columns) and FFN channels 8..15 (down columns)."""
    info = resolve_source(source)
    dims = info.dims
    g = torch.Generator().manual_seed(seed)
    heads, channels = [0, 2], list(range(8, 16))
    slices, groups = {}, {}
    for layer in range(dims.layers):
        for role, units in (("q", heads), ("o", heads), ("down", channels)):
            (name,) = info.tensors(role, layer)
            coupled = info.coupled(name)
            assert coupled is not None, name  # q, o and down are coupled in every family
            axis = coupled.axis
            indices = info.unit_indices(name, role, units)
            shape = (len(indices), dims.hidden) if axis == "rows" else (dims.hidden, len(indices))
            slices[name] = (axis, indices, torch.randn(*shape, generator=g) * 0.02)
            if role != "down":
                groups[name] = dims.head_dim
    return S2FTAdapter.from_slices(source, slices, base_name="s2reg-demo/tiny-llama", group_sizes=groups,
                                   params={"heads": heads, "channels": channels})


def known_pisa(source: CheckpointSource, seed: int = 1, block: int = 16, k: int = 8) -> PISAAdapter:
    """``k`` random half-plane coefficients per ``block x block`` block of every q and v projection."""
    info = resolve_source(source)
    g = torch.Generator().manual_seed(seed)
    positions = block * (block // 2 + 1)
    coefficients = {}
    for layer in range(info.dims.layers):
        for role in ("q", "v"):
            (name,) = info.tensors(role, layer)
            rows, cols = source.shape(name)
            blocks = -(-rows // block) * -(-cols // block)
            idx = torch.stack([torch.randperm(positions, generator=g)[:k] for _ in range(blocks)])
            values = torch.complex(torch.randn(blocks, k, generator=g), torch.randn(blocks, k, generator=g))
            coefficients[name] = ((block, block), idx, values)
    return PISAAdapter.from_coefficients(source, coefficients, base_name="s2reg-demo/tiny-llama", scale=0.05,
                                         params={"block": block, "coefficients": k})


def _same_bytes(x, y) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _same(a: Adapter, b: Adapter) -> bool:
    return a.targets.keys() == b.targets.keys() and all(
        _same_bytes(x, b.targets[n].payload_tensors(n)[key])
        for n, t in a.targets.items()
        for key, x in t.payload_tensors(n).items()
    )


@dataclass(frozen=True)
class SurgeryChecks(Result):
    """The tour's merge/unmerge round trips, each bit for bit."""

    s2ft_tensors_bit_identical_after_unmerge: bool
    in_place_round_trip_bit_identical: bool


@dataclass(frozen=True)
class Story(Result):
    """Train -> push -> fuse -> merge: what training did, the registry's refs, and whether merging the fusion
    equals merging both adapters."""

    trainable_parameters: int
    steps: int
    eval_loss_before: float | None  # None: no held-out examples to measure on
    eval_loss_after: float | None
    registry: tuple[str, ...]
    fused_merge_equals_merging_both: bool


@dataclass(frozen=True)
class DemoResult(Result):
    """The tour in ``workdir``: both adapters described (``"s2ft"``, ``"pisa"``), the surgery checks, the story."""

    workdir: str
    adapters: Mapping[str, Description]
    surgery: SurgeryChecks
    story: Story


def run_demo(workdir: Path, step: Step = lambda _: None) -> DemoResult:
    """Run the tour in ``workdir`` (replaced); return the reports of both adapters and the surgery checks."""
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    step("building the fixture model (tiny Llama, GQA 4/2 heads, bf16)")
    base_dir = build_checkpoint(workdir / "base", "llama", dtype=torch.bfloat16, num_hidden_layers=4)
    reports: dict[str, Description] = {}
    with CheckpointSource(base_dir) as source:
        for name, make in (("s2ft", known_s2ft), ("pisa", known_pisa)):
            step(f"creating the {name} adapter from known deltas")
            adapter = make(source)
            path = workdir / f"{name}-adapter"
            adapter.save(path)
            step(f"reloading and validating {path.name} against the base")
            loaded = load(path)
            if not _same(adapter, loaded):
                raise AssertionError(f"{name}: reloaded adapter differs from the saved one")
            loaded.verify_base(source)
            reports[name] = describe(loaded)
        original = {n: source.sha256_of(n) for n in source.names()}
    adapters = [load(workdir / "s2ft-adapter"), load(workdir / "pisa-adapter")]
    step("merging both adapters into the base (new checkpoint), then unmerging them, newest first")
    merge(base_dir, adapters, workdir / "merged")
    unmerge(workdir / "merged", adapters[1:], workdir / "s2ft-only")
    unmerge(workdir / "s2ft-only", adapters[:1], workdir / "restored")
    step("merging and unmerging the S2FT adapter in place on a copy (journaled)")
    shutil.copytree(base_dir, workdir / "in-place")
    merge_in_place(workdir / "in-place", adapters[:1])
    unmerge_in_place(workdir / "in-place", adapters[:1])
    with CheckpointSource(workdir / "restored") as restored, CheckpointSource(workdir / "in-place") as patched:
        s2ft_only = set(adapters[0].targets) - set(adapters[1].targets)
        surgery = SurgeryChecks(
            s2ft_tensors_bit_identical_after_unmerge=all(restored.sha256_of(n) == original[n] for n in s2ft_only),
            in_place_round_trip_bit_identical=all(patched.sha256_of(n) == original[n] for n in original),
        )
    if not all(surgery.as_json().values()):
        raise AssertionError(f"surgery round trip was not exact: {surgery}")
    return DemoResult(str(workdir), reports, surgery, _train_push_fuse_merge(workdir, base_dir, adapters[0], step))


def _pattern_data(path: Path, count: int = 256, length: int = 16) -> Path:
    """Pre-tokenised sequences with a learnable rule (arithmetic progressions of token ids)."""
    g = torch.Generator().manual_seed(0)
    starts, steps = torch.randint(0, 200, (count,), generator=g), torch.randint(1, 5, (count,), generator=g)
    lines = [json.dumps({"input_ids": [3 + (int(a) + i * int(d)) % 200 for i in range(length)]}) for a, d in zip(starts, steps, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train_push_fuse_merge(workdir: Path, base_dir: Path, known: Adapter, step: Step) -> Story:
    """Train an S2FT adapter disjoint from ``known``, store both, fuse them, merge the fusion."""
    from .train import S2FTConfig
    from .train.session import run_training
    from .train.settings import TrainConfig, TrainOptions

    step("training an S2FT adapter (2 heads and 32 FFN channels per layer, disjoint from the first one)")
    options = TrainOptions(S2FTConfig(channels=32, heads=2, roles=("o", "down"), exclude=(known,)),
                           loop=TrainConfig(epochs=2, batch_size=8, lr=2.5e-4), eval_fraction=0.25,
                           base_name="s2reg-demo/tiny-llama", device="cpu")
    run = run_training(base_dir, _pattern_data(workdir / "pattern.jsonl"), options, output=workdir / "trained-adapter")
    step("pushing both adapters to the local registry (registry/ in the work directory)")
    store = Store(workdir / "registry")
    store.push(workdir / "s2ft-adapter", "demo/known:v1")
    store.push(workdir / "trained-adapter", "demo/trained:v1")
    step("fusing them (disjoint supports: an exact concatenation) and merging the fusion into the base")
    fused = fuse([store.load("demo/known:v1"), store.load("demo/trained:v1")]).adapter
    store.push(fused, "demo/fused:v1")
    merge(base_dir, [store.load("demo/fused:v1")], workdir / "merged-fused")
    merge(base_dir, [store.load("demo/known:v1"), store.load("demo/trained:v1")], workdir / "merged-both")
    with CheckpointSource(workdir / "merged-fused") as a, CheckpointSource(workdir / "merged-both") as b:
        same = all(a.sha256_of(n) == b.sha256_of(n) for n in a.names())
    if not same:
        raise AssertionError("merging the fused adapter differs from merging both adapters")
    return Story(
        trainable_parameters=run.trainable,
        steps=run.result.steps,
        eval_loss_before=run.result.eval_loss_before,
        eval_loss_after=run.result.eval_loss_after,
        registry=tuple(str(r) for r in store.refs()),
        fused_merge_equals_merging_both=same,
    )
