"""The README.md (model card) pushed beside an adapter, so the Hub shows what it is."""

from __future__ import annotations

from ..basename import is_hub_id, portable_base_name
from ..format import Adapter
from ..kinds import kind_named
from ..ops.describe import describe


def model_card(adapter: Adapter, ref: str) -> str:
    """The card's front matter links the base (``base_model:``) only when the adapter names it by a Hub id; a
    base named by a directory is shown by that directory's name, never by a path of the pushing machine."""
    report = describe(adapter)
    s = report.summary
    base = portable_base_name(adapter.base.name)
    linked = [f"base_model: {base}", "base_model_relation: adapter"] if is_hub_id(base) else []
    front = [
        "---",
        "library_name: s2reg",
        *linked,
        "tags:",
        "- s2reg",
        f"- {adapter.kind}",
        "- peft",
        "---",
        "",
    ]
    rows = [
        "| layer | module | selection | params | % of base |",
        "|---|---|---|---:|---:|",
    ]
    for r in report.targets:
        what = kind_named(r["kind"]).card_text(r)
        rows.append(f"| {'' if r['layer'] is None else r['layer']} | {r['module']} | {what} | {r['params']:,} | {r['percent_of_base']:.2f} |")
    body = [
        f"# {ref}",
        "",
        f"A **{adapter.kind.upper()}** adapter for `{base}` in the s2reg adapter format "
        f"v{adapter.format_version}: "
        f"{s.targets} target tensors, {s.params:,} parameters.",
        "",
        "```bash",
        "pip install s2reg",
        f"s2reg pull hf://REPO {ref}",
        f"s2reg merge BASE_CHECKPOINT {ref} -o merged",
        "```",
        "",
        *rows,
        "",
    ]
    return "\n".join(front + body)
