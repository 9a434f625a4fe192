"""Which description fits a checkpoint: the user's file, then ``model_type``, then tensor names and shapes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..fsread import read_json
from .dims import read_dims
from .model import ModelInfo, match_name
from .schema import FORMAT_HELP, ArchError, Family

ARCH_FILE = "s2reg-arch.json"


def _read_json(path: Path, where: str) -> Any:
    try:
        return read_json(path, error=ArchError)
    except OSError as e:
        raise ArchError(f"{where}: cannot read ({e.strerror})") from None
    except ArchError as e:
        raise ArchError(f"{e} ({FORMAT_HELP})") from None


@lru_cache(maxsize=1)
def builtin_families() -> tuple[Family, ...]:
    """Every built-in description (s2reg/arch/families/*.json), base layouts before the ones extending them."""
    folder = resources.files(__package__) / "families"
    raw = {p.name.removesuffix(".json"): json.loads(p.read_text()) for p in folder.iterdir() if p.name.endswith(".json")}
    done: dict[str, Family] = {}

    def build(name: str) -> Family:
        if name not in done:
            data = raw[name]
            base = build(data["extends"]) if "extends" in data else None
            done[name] = Family.from_json(data, source=f"built-in {name}.json", base=base)
        return done[name]

    for name in sorted(raw):
        build(name)
    return tuple(done.values())


def load_description(path: str | Path) -> Family:
    """A user's description file (``--arch FILE`` or ``s2reg-arch.json`` beside the checkpoint), validated."""
    path = Path(path)
    data = _read_json(path, str(path))
    base = None
    if isinstance(data, dict) and "extends" in data:
        by_name = {f.name: f for f in builtin_families()}
        if data["extends"] not in by_name:
            raise ArchError(f"{path}: 'extends' names {data['extends']!r}, not a built-in family "
                            f"({', '.join(sorted(by_name))}) ({FORMAT_HELP})")
        base = by_name[data["extends"]]
    return Family.from_json(data, source=str(path), base=base)


def _conditions_hold(family: Family, config: Mapping[str, Any]) -> bool:
    return all(config.get(key) == value for key, value in family.when)


def _prefix(family: Family, tensors: Mapping[str, tuple[int, ...]]) -> tuple[str, int]:
    """The most common prefix in front of the family's layer tensors, and how many tensors have it."""
    counts: Counter[str] = Counter()
    for name in tensors:
        m = match_name(family, name)
        if m:
            counts[m[1]["prefix"]] += 1
    if not counts:
        return family.prefix, 0
    best = max(counts.values())
    winners = [p for p, n in counts.items() if n == best]
    return (family.prefix if family.prefix in winners else min(winners, key=len)), best


def _fit(family: Family, config: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]] | None,
         note: str | None) -> ModelInfo:
    """``family`` applied to the checkpoint; ArchError (one line) when its tensors do not fit."""
    dims = read_dims(family, config)
    if tensors is None:
        return ModelInfo(family, dims, family.prefix, note, None, config)
    prefix, found = _prefix(family, tensors)
    if not found:
        raise ArchError(f"no tensor of the {family.name} layout ({family.layers}.{family.tensors[0].key}...) in the checkpoint")
    info = ModelInfo(family, dims, prefix, note, tensors, config)
    roles_per_layer: dict[int, set[str]] = {}
    for name in tensors:
        c = info.coupled(name)
        if c is None or not name.startswith(prefix):
            continue
        info.units_of(name, [])  # builds the layout: raises when the shape does not fit
        if not c.follower:
            roles_per_layer.setdefault(c.layer, set()).update(c.roles)
    for layer in range(dims.layers):
        missing = [r for r in family.roles if r not in roles_per_layer.get(layer, set())]
        if missing:
            raise ArchError(f"layer {layer} has no {missing[0]!r} tensor of the {family.name} layout "
                            f"({dims.layers} layers in config.json)")
    return info


def resolve(config: Mapping[str, Any] | None, tensors: Mapping[str, tuple[int, ...]] | None = None,
            arch_file: str | Path | None = None) -> ModelInfo:
    """The description of a checkpoint, applied to it (see the package docstring)."""
    if not config:
        raise ArchError("the checkpoint has no config.json, so its heads and channels are unknown; "
                        "put the model's config.json beside its weights")
    if arch_file is not None:
        return _fit(load_description(arch_file), config, tensors, None)
    model_type = config.get("model_type")
    known = [f for f in builtin_families() if model_type in f.model_types]
    if known:
        matching = [f for f in known if _conditions_hold(f, config)] or known
        errors = []
        for family in matching:
            try:
                return _fit(family, config, tensors, None)
            except ArchError as e:
                errors.append(str(e))
        raise ArchError(f"model_type {model_type!r}: {errors[0]}; describe the layout with --arch FILE ({FORMAT_HELP})")
    if tensors is None:
        raise ArchError(f"unknown model_type {model_type!r} and no tensor names to recognise its layout from; "
                        f"pass --arch FILE ({FORMAT_HELP})")
    candidates = []
    for family in builtin_families():
        try:
            info = _fit(family, config, tensors, None)
        except ArchError:
            continue
        matched = sum(1 for n in tensors if info.coupled(n) is not None)
        candidates.append((-matched, family.extends is not None, len(family.tensors), family.name, info))
    if not candidates:
        example = next(iter(sorted(tensors)), "(none)")
        raise ArchError(f"unknown layout: model_type {model_type!r} and tensor names like {example!r} fit no built-in "
                        f"family; describe it in a JSON file and pass --arch FILE or save it as {ARCH_FILE} beside the "
                        f"checkpoint ({FORMAT_HELP})")
    candidates.sort(key=lambda c: c[:4])
    info = candidates[0][4]
    what = f"unknown model_type {model_type!r}" if model_type else "config.json has no model_type"
    info.note = f"{what}: assumed the {info.family.name} layout from tensor names"
    return info


def resolve_source(source: Any, arch_file: str | Path | None = None) -> ModelInfo:
    """:func:`resolve` for a tensor source (checkpoint directory, .bin, in memory); finds ``s2reg-arch.json`` beside it."""
    directory = getattr(source, "directory", None)
    if arch_file is None and directory is not None and (Path(directory) / ARCH_FILE).is_file():
        arch_file = Path(directory) / ARCH_FILE
    return resolve(source.config(), {n: tuple(source.shape(n)) for n in source.names()}, arch_file)
