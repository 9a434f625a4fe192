"""Merge an adapter into a checkpoint: s2reg merge -o and --in-place vs the PEFT path, side by side.

    python bench/merge.py [--big] [--channels 32] [--repeats 3]

For SmolLM2-135M (and with --big a ~1.7 GB synthetic Llama from make_big_checkpoint.py): an S2FT
adapter of ``--channels`` down_proj channels per layer, and a PEFT LoRA on down_proj with the same
trainable parameter count. Each command runs as its own process under /usr/bin/time, ``--repeats``
times in turn with the others: the median wall time (until its output is on disk: s2reg fsyncs, PEFT
does not, so a ``sync`` ends every timing) and the largest peak RSS. The PEFT path is what users do
today: load the model, PeftModel.from_pretrained, merge_and_unload, save_pretrained.

Between rounds an untimed ``unmerge --in-place`` restores the base. Its first round, ``merge --in-place``
hashes the base tensors for the base check; in later rounds it finds the hashes that unmerge remembered
(spec/SURGERY.md §6), as when a user swaps adapters in one checkpoint. The ``S2REG_HASH_CACHE=0`` row
hashes every time: the cost of a first merge into a checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter_size import s2ft_adapter
from make_big_checkpoint import make
from measure import python, run

from fixtures.smollm2 import build_smollm2
from s2reg.arch import resolve_source
from s2reg.tensors import CheckpointSource

PEFT_MERGE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""


def make_lora(base: Path, out: Path, rank: int) -> int:
    """A PEFT LoRA adapter of ``rank`` on down_proj for ``base``, saved by PEFT, with random factors. The
    model is built on the meta device, so a base of any size costs no memory."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=["down_proj"]))
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(t.shape, generator=g) * 1e-3  # fp32, as PEFT keeps and saves its factors
             for name, t in sorted(get_peft_model_state_dict(peft_model).items())}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(out)
    return sum(t.numel() for t in state.values())


def bench(label: str, base: Path, work: Path, channels: int, repeats: int) -> list[tuple]:
    with CheckpointSource(base) as source:
        dims = resolve_source(source).dims
        adapter = s2ft_adapter(source, dims, channels, torch.Generator().manual_seed(0))
    adapter.save(work / "s2ft")
    rank = max(1, round(adapter.num_params / (dims.layers * (dims.hidden + dims.intermediate))))
    lora_params = make_lora(base, work / "lora", rank)
    shutil.copytree(base, work / "inplace")
    for f in base.iterdir():  # warm the page cache so every contender reads from memory
        f.read_bytes() if f.stat().st_size < 2**31 else None
    s2reg = [sys.executable, "-m", "s2reg"]
    home = {"S2REG_HOME": str(work / "home")}  # hashes remembered here, never the user's own (spec/SURGERY.md §6)
    in_place = s2reg + ["merge", str(work / "inplace"), str(work / "s2ft"), "--in-place"]
    contenders = {
        f"s2reg merge -o ({adapter.num_params:,} params)":
            (s2reg + ["merge", str(base), str(work / "s2ft"), "-o", str(work / "merged-s2reg")], work / "merged-s2reg", home),
        "s2reg merge --in-place": (in_place, None, home),
        "s2reg merge --in-place, hashing the base every time (S2REG_HASH_CACHE=0)":
            (in_place, None, {**home, "S2REG_HASH_CACHE": "0"}),
        f"PEFT LoRA r={rank} merge_and_unload + save ({lora_params:,} params)":
            (python(PEFT_MERGE, str(base), str(work / "lora"), str(work / "merged-peft")), work / "merged-peft", home),
        "cp -r of the same checkpoint (the disk's floor for -o)":
            (["cp", "-r", str(base), str(work / "copied")], work / "copied", home),
        "floor: start Python and import s2reg.cli (no torch)": ([sys.executable, "-c", "import s2reg.cli"], None, home),
    }
    timings = {name: [] for name in contenders}
    for _ in range(repeats):  # in turn, so that a busy disk's drift hits every contender alike
        for name, (argv, output, env) in contenders.items():
            timings[name].append(run(argv, env=env))
            if output is not None:
                shutil.rmtree(output)
            elif "--in-place" in argv:  # back to the base for the next round (untimed)
                run(s2reg + ["unmerge", str(work / "inplace"), str(work / "s2ft"), "--in-place"], env=home)
    rows = [(name, statistics.median(w for w, _ in runs), max(r for _, r in runs)) for name, runs in timings.items()]
    _, peft_wall, peft_rss = next(row for row in rows if row[0].startswith("PEFT"))
    shard_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e6
    print(f"\n### {label}\n")
    print("| path | wall s | MB/s of shards | peak RSS MiB | time vs PEFT | RSS vs PEFT |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, rss in rows:
        rate = f"{shard_mb / wall:.0f}" if name.startswith(("s2reg merge -o", "cp ")) else ""
        print(f"| {name} | {wall:.2f} | {rate} | {rss:.0f} | {peft_wall / wall:.1f}x faster | {100 * rss / peft_rss:.0f}% |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="also the ~1.7 GB synthetic checkpoint")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender (the median is shown)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "smol").mkdir()
        bench("SmolLM2-135M (bf16, 3 shards, 270 MB)", build_smollm2(), tmp / "smol", args.channels, args.repeats)
        if args.big:
            (tmp / "big").mkdir()
            base = make(tmp / "big-base")
            bench("synthetic Llama, 16 layers, hidden 2048 (bf16, 4 shards, 1.7 GB)", base, tmp / "big", args.channels,
                  args.repeats)


if __name__ == "__main__":
    main()
