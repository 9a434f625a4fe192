"""The ``s2reg`` command line: thin click commands over the Python API.

Each command family lives in its own module. Start-up imports none of them: :data:`COMMANDS`
names every command's module and its one-line summary, so ``s2reg --help`` lists them all and a
command's module (with whatever it needs: torch for ``train``, numpy for the rest) is imported only
when that command runs. tests/cli/test_lazy.py keeps the summaries equal to the commands' own help.
Library errors (:class:`s2reg.errors.S2RegError`) and OS errors become a one-line ``Error: ...``
with exit status 1 here, at the edge, so the library never imports click.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import click

from .._version import __version__
from ..errors import S2RegError
from ..format import limits
from .common import one_line_error


@dataclass(frozen=True)
class Lazy:
    """Where a command lives (``module`` under s2reg.cli, the click command ``attribute``) and its summary."""

    module: str
    attribute: str
    summary: str

    def load(self) -> click.Command:
        return getattr(importlib.import_module(f".{self.module}", __name__), self.attribute)


COMMANDS: dict[str, Lazy] = {
    "demo": Lazy("demo", "demo_command", "The tour on embedded defaults: fixture model, S2FT and PISA adapters, "
                                         "inspect, merge/unmerge, then train -> push (local registry) -> fuse -> merge."),
    "diff": Lazy("diff", "diff_command", "Compare A and B: two adapters (paths or NAME:TAG) or two checkpoints."),
    "export": Lazy("interop", "export_command", "Write ADAPTER as a PEFT LoRA directory (vLLM, PEFT) or a "
                                                "llama.cpp LoRA GGUF (llama.cpp, Ollama)."),
    "extract": Lazy("extract", "extract_command", "Compare BASE and TUNED tensor by tensor and store what changed "
                                                  "as an adapter."),
    "fuse": Lazy("fuse", "fuse_command", "Fuse ADAPTERS (same kind, same base) into one adapter."),
    "generate": Lazy("generate", "generate_command", "Generate from BASE with each ADAPTER (greedy), without writing a "
                                                     "merged checkpoint."),
    "gc": Lazy("registry", "gc_command", "Delete blobs that no ref points at."),
    "import": Lazy("interop", "import_command", "Turn a PEFT adapter into an s2reg adapter: FourierFT -> PISA, "
                                                "one-hot LoRA -> S2FT."),
    "inspect": Lazy("inspect", "inspect_command", "Show an adapter's targets, selections, sizes and norms."),
    "ls": Lazy("registry", "ls_command", "List the stored adapters."),
    "merge": Lazy("surgery", "merge_command", "Merge ADAPTERS (in order) into CHECKPOINT (the base)."),
    "permute": Lazy("surgery", "permute_command", "Co-permute heads and FFN channels so the planned selection is "
                                                  "contiguous."),
    "pull": Lazy("registry", "pull_command", "Fetch an adapter from the Hub into the local store, or copy a stored "
                                             "one out to a directory."),
    "push": Lazy("registry", "push_command", "Store an adapter locally, or publish a stored one on the Hugging Face "
                                             "Hub."),
    "recover": Lazy("surgery", "recover_command", "Finish an interrupted in-place merge/unmerge of CHECKPOINT: roll "
                                                  "back (default) or --forward."),
    "rm": Lazy("registry", "rm_command", "Remove refs (their blobs go at the next `s2reg gc`)."),
    "show": Lazy("registry", "show_command", "Show a stored adapter (verified), like `s2reg inspect`."),
    "tag": Lazy("registry", "tag_command", "Point TARGET at the adapter SOURCE points at (no bytes copied)."),
    "train": Lazy("train", "train_command", "Fine-tune BASE on DATA with S2FT or PISA and write the adapter to "
                                            "OUTPUT."),
    "unmerge": Lazy("surgery", "unmerge_command", "Take ADAPTERS out of CHECKPOINT (a merged one) again."),
    "unpermute": Lazy("surgery", "unpermute_command", "Write a permuted checkpoint back in its original order "
                                                      "(bit-identical to the original)."),
    "validate": Lazy("validate", "validate_command", "Check an adapter against spec/FORMAT.md: structure, sha256 "
                                                     "digests, index ranges, finiteness."),
    "verify": Lazy("registry", "verify_command", "Re-hash every blob in the store; quarantine corrupt ones (and "
                                                 "anything that is not a regular file) and name the refs they break; "
                                                 "remove views that are not exactly their blobs."),
}


class _LoadedOnUse(Mapping[str, click.Command]):
    """``group.commands``: every name of :data:`COMMANDS`, each command imported on first lookup."""

    def __init__(self, table: Mapping[str, Lazy]):
        self._table = table
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            self._loaded[name] = self._table[name].load()
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


class _Group(click.Group):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands = _LoadedOnUse(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self.commands[cmd_name] if cmd_name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list from the summaries, as click would write it from the loaded commands."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = [(name, click.Command(name, help=COMMANDS[name].summary).get_short_help_str(limit)) for name in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (S2RegError, OSError) as exc:
            raise one_line_error(exc) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="s2reg")
@click.option("--max-decompressed", type=click.IntRange(min=0), metavar="BYTES",
              help=f"Refuse adapters whose payload decompresses to more than BYTES "
                   f"(default {limits.MAX_DECOMPRESSED.default:,}; env {limits.MAX_DECOMPRESSED.env}).")
@click.option("--max-dense", type=click.IntRange(min=0), metavar="ELEMENTS",
              help=f"Refuse to densify a target of more than ELEMENTS when no base checkpoint vouches for its shape "
                   f"(default {limits.MAX_DENSE.default:,}; env {limits.MAX_DENSE.env}).")
@click.pass_context
def main(ctx: click.Context, max_decompressed: int | None, max_dense: int | None) -> None:
    """s2reg: adapters for structured-sparse (S2FT) and spectral (PISA) fine-tuning.

    Adapters are directories holding a JSON manifest and a safetensors payload
    (spec/FORMAT.md). Commands train, inspect, validate, extract, merge, fuse,
    diff, export and share them; `s2reg demo` tours everything on a tiny model.
    """
    for limit, value in ((limits.MAX_DECOMPRESSED, max_decompressed), (limits.MAX_DENSE, max_dense)):
        if value is not None:
            ctx.with_resource(limit.raised(value))
