"""Checkpoint surgery at Llama-3-8B's shape (bf16, ~16 GB in 4 shards): s2reg against its peers and the disk.

    python bench/surgery_8b.py [--work DIR] [--base DIR] [--layers N] [--pisa-layers 32] [--memory MIB] [--json FILE]

The checkpoint comes from ``make_big_checkpoint.py --shape llama3-8b`` (built in ``--work`` unless
``--base`` names one already built; ``--layers`` builds only the first N decoder layers, whose tensors are
those of the whole model's first N; everything under ``--work`` is deleted at the end, also on a
failure). Contenders, each its own process, timed until its output is on disk (a ``sync`` ends
every timing), with its peak RSS from ``wait4`` and the bytes it wrote (``ru_oublock``):

- ``cp -r`` of the checkpoint, the floor for ``s2reg merge -o``, against ``s2reg merge -o`` of an S2FT
  adapter (32 ``down_proj`` channels per layer, as in merge.py);
- ``s2reg merge --in-place`` of that adapter (first, hashing the base; again after an in-place
  unmerge, with the hashes it remembered), against ``dd if=/dev/zero ... conv=fdatasync`` of the bytes
  of the tensors it patches (32 random columns touch every page of each ``down_proj``);
- PEFT's load-merge-save of a LoRA with the same parameter count (merge.py's ``PEFT_MERGE``), run
  under a memory guard (``measure.run_limited``: killed once its anonymous memory passes ``--memory``,
  by default what the machine has available less 1 GiB), so that a PEFT that cannot fit fails alone and
  says how far it got;
- a PISA adapter at PISA's defaults (every projection of ``--pisa-layers`` layers, 64x64 blocks, 32
  coefficients per block) merged ``--in-place``, against the floor of reading the bytes of the tensors it
  touches (``dd iflag=direct``: the page cache bypassed) and writing them (``dd ... conv=fdatasync``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapter_size import s2ft_adapter
from make_big_checkpoint import make
from measure import available_mib, python, run_limited
from merge import PEFT_MERGE, make_lora

from s2reg import PISAAdapter
from s2reg.arch import resolve_source
from s2reg.tensors import CheckpointSource

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
BLOCK, COEFFICIENTS = 64, 32  # PISAConfig's defaults
PEFT_STAGES = """
import sys, time
started = time.perf_counter()
def stage(what):
    print(f"{time.perf_counter() - started:7.1f} s  {what}", file=sys.stderr, flush=True)
stage("start")
"""


def pisa_default_adapter(source, layers: int, g) -> PISAAdapter:
    """PISA at its defaults on every projection of the first ``layers`` layers: ``COEFFICIENTS`` random
    frequency positions of each ``BLOCK`` x ``BLOCK`` block's rfft2, random complex values."""
    positions = BLOCK * (BLOCK // 2 + 1)
    coefficients = {}
    for layer in range(layers):
        for projection in PROJECTIONS:
            name = f"model.layers.{layer}.{projection}.weight"
            rows, cols = source.shape(name)
            blocks = -(-rows // BLOCK) * -(-cols // BLOCK)
            idx = torch.rand(blocks, positions, generator=g).argsort(dim=1)[:, :COEFFICIENTS]
            values = torch.complex(*torch.randn(2, blocks, COEFFICIENTS, generator=g)) * 0.05
            coefficients[name] = ((BLOCK, BLOCK), idx, values)
    return PISAAdapter.from_coefficients(source, coefficients, base_name="synthetic/llama3-8b-shape",
                                         scale=(BLOCK * BLOCK / 2) ** 0.5)


def tensor_bytes(source, names) -> int:
    return sum(source.shape(n)[0] * source.shape(n)[1] * 2 for n in names)  # bf16


def dd_write(path: Path, nbytes: int) -> list[str]:
    mib = -(-nbytes // 2**20)
    return ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fdatasync", "status=none"]


def dd_read(shards: list[Path], nbytes: int) -> list[str]:
    """Read ``nbytes`` from ``shards`` in turn (one process), the page cache bypassed (O_DIRECT)."""
    script = "; ".join(f"dd if={s} of=/dev/null bs=4M iflag=direct,count_bytes count={n} status=none"
                       for s, n in split(shards, nbytes))
    return ["sh", "-c", script]


def split(shards: list[Path], nbytes: int) -> list[tuple[Path, int]]:
    out = []
    for shard in shards:
        take = min(nbytes, shard.stat().st_size)
        if take > 0:
            out.append((shard, take))
        nbytes -= take
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/s2reg-surgery-8b"))
    parser.add_argument("--base", type=Path, help="a llama3-8b checkpoint already built (deleted at the end too)")
    parser.add_argument("--keep-base", action="store_true", help="do not delete --base at the end")
    parser.add_argument("--layers", type=int, help="build only this many decoder layers (default: Llama-3-8B's 32)")
    parser.add_argument("--pisa-layers", type=int, default=32)
    parser.add_argument("--memory", type=float, help="MiB of anonymous memory PEFT may use (default: available - 1 GiB)")
    parser.add_argument("--skip", default="", help="comma-separated contender keys to leave out")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--report", type=Path, help="print the table of a --json file written before, and exit")
    args = parser.parse_args()
    if args.report:
        return print(table(json.loads(args.report.read_text())["rows"]))
    work, skip = args.work, set(filter(None, args.skip.split(",")))
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    home = {"S2REG_HOME": str(work / "home")}
    s2reg = [sys.executable, "-m", "s2reg"]

    def contend(key: str, label: str, argv: list[str], *, env=None, limit: float | None = None, output: Path | None = None):
        if key in skip:
            return None
        print(f"{time.strftime('%H:%M:%S')} {label} ...", file=sys.stderr, flush=True)
        done = run_limited(argv, limit or 1e9, env={**home, **(env or {})}, durable=True, anon=True)
        if output is not None and output.exists():
            shutil.rmtree(output)
        row = {k: v for k, v in done.items() if k != "stdout"}
        row["label"] = label
        if done["rc"] != 0:
            row["error_tail"] = done["stderr"].strip()[-3000:]
        if key != "peft":
            row.pop("stderr")
        print(f"    {done['wall_s']:.1f} s, peak RSS {done['peak_rss_mib']:.0f} MiB, wrote "
              f"{done['written_bytes'] / 1e9:.2f} GB, rc {done['rc']}"
              + (f", killed at {done['killed_at_mib']:.0f} MiB" if done["killed_at_mib"] else ""), file=sys.stderr, flush=True)
        if done["rc"] != 0:
            print(done["stderr"][-2000:], file=sys.stderr, flush=True)
        rows[key] = row
        return row

    try:
        started = time.perf_counter()
        base = args.base or make(work / "base", args.layers, shape="llama3-8b")
        rows["build_s"] = {"wall_s": time.perf_counter() - started, "reused": args.base is not None}
        shards = sorted(base.glob("*.safetensors"))
        shard_bytes = sum(s.stat().st_size for s in shards)
        with CheckpointSource(base) as source:
            dims = resolve_source(source).dims
            s2ft = s2ft_adapter(source, dims, 32, torch.Generator().manual_seed(0))
            s2ft.save(work / "s2ft")
            pisa = pisa_default_adapter(source, args.pisa_layers, torch.Generator().manual_seed(1))
            pisa.save(work / "pisa")
            down_bytes = tensor_bytes(source, [f"model.layers.{i}.mlp.down_proj.weight" for i in range(dims.layers)])
            pisa_bytes = tensor_bytes(source, [f"model.layers.{i}.{p}.weight" for i in range(args.pisa_layers)
                                               for p in PROJECTIONS])
        rank = max(1, round(s2ft.num_params / (dims.layers * (dims.hidden + dims.intermediate))))
        lora_params = make_lora(base, work / "lora", rank)
        meta = {"shard_bytes": shard_bytes, "s2ft_params": s2ft.num_params, "lora_rank": rank,
                "lora_params": lora_params, "down_proj_bytes": down_bytes, "pisa_layers": args.pisa_layers,
                "pisa_params": pisa.num_params, "pisa_tensor_bytes": pisa_bytes}
        print(json.dumps(meta), file=sys.stderr, flush=True)
        inplace = work / "inplace"

        # PEFT first, while this benchmark holds no other memory
        limit = args.memory or available_mib() - 1024
        peft = PEFT_STAGES + PEFT_MERGE.replace("\nmodel = PeftModel", "\nstage('base loaded')\nmodel = PeftModel") \
            .replace("\nmodel.save_pretrained", "\nstage('merged')\nmodel.save_pretrained") + "\nstage('saved')\n"
        row = contend("peft", f"PEFT LoRA r={rank} load + merge_and_unload + save ({lora_params:,} params)",
                      python(peft, str(base), str(work / "lora"), str(work / "merged-peft")), limit=limit,
                      output=work / "merged-peft")
        if row is not None:
            row["stages"] = [line.strip() for line in row.pop("stderr").splitlines() if line.strip().endswith(
                ("start", "loaded", "merged", "saved"))]
        contend("cp", "cp -r of the checkpoint (the floor for -o)", ["cp", "-r", str(base), str(inplace)])
        if not inplace.exists():
            shutil.copytree(base, inplace)
        contend("merge_o", f"s2reg merge -o (S2FT, {s2ft.num_params:,} params)",
                s2reg + ["merge", str(base), str(work / "s2ft"), "-o", str(work / "merged")], output=work / "merged")
        contend("inplace_first", "s2reg merge --in-place (S2FT; first: hashes the base)",
                s2reg + ["merge", str(inplace), str(work / "s2ft"), "--in-place"])
        contend("unmerge", "s2reg unmerge --in-place (S2FT)", s2reg + ["unmerge", str(inplace), str(work / "s2ft"), "--in-place"])
        contend("inplace", "s2reg merge --in-place (S2FT; base hashes remembered)",
                s2reg + ["merge", str(inplace), str(work / "s2ft"), "--in-place"])
        contend("unmerge2", "s2reg unmerge --in-place (S2FT, again)",
                s2reg + ["unmerge", str(inplace), str(work / "s2ft"), "--in-place"])
        contend("dd_down", f"dd ... conv=fdatasync of the down_proj bytes ({down_bytes / 1e9:.2f} GB)",
                dd_write(work / "dd", down_bytes))
        (work / "dd").unlink(missing_ok=True)
        contend("pisa", f"s2reg merge --in-place (PISA defaults, every projection of {args.pisa_layers} layers, "
                        f"{pisa.num_params:,} params)", s2reg + ["merge", str(inplace), str(work / "pisa"), "--in-place"])
        contend("pisa_read", f"floor: read {pisa_bytes / 1e9:.2f} GB (dd iflag=direct)", dd_read(shards, pisa_bytes))
        contend("pisa_write", f"floor: write {pisa_bytes / 1e9:.2f} GB (dd conv=fdatasync)", dd_write(work / "dd", pisa_bytes))
        (work / "dd").unlink(missing_ok=True)
        rows["meta"] = meta
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.base is not None and not args.keep_base:
            shutil.rmtree(args.base, ignore_errors=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                             "rows": rows}, indent=1) + "\n")
    print(table(rows))


def table(rows: dict) -> str:
    """Markdown: every contender with its wall time, rate, peak RSS and bytes written, against its floor
    (``cp -r`` for ``-o``, ``dd`` of the patched tensors' bytes for the in-place S2FT paths, reading and
    writing the touched tensors for PISA) and against PEFT's load-merge-save."""
    meta = rows["meta"]
    out = ["| path | wall s | GB/s of shards | peak RSS MiB | GB written | vs its floor | PEFT / it |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    floors = {"merge_o": "cp", "inplace_first": "dd_down", "inplace": "dd_down", "unmerge": "dd_down",
              "unmerge2": "dd_down", "pisa": "pisa_floor"}
    pisa_floor = sum(rows[k]["wall_s"] for k in ("pisa_read", "pisa_write") if k in rows)
    peft = rows.get("peft", {}).get("wall_s") if rows.get("peft", {}).get("rc") == 0 else None
    for key, r in rows.items():
        if key in ("meta", "build_s"):
            continue
        floor = pisa_floor if floors.get(key) == "pisa_floor" else rows.get(floors.get(key), {}).get("wall_s")
        rate = f"{meta['shard_bytes'] / r['wall_s'] / 1e9:.2f}" if key in ("cp", "merge_o") else ""
        status = "" if r["rc"] == 0 else (f" — killed at {r['killed_at_mib'] / 1024:.1f} GiB" if r["killed_at_mib"]
                                          else f" — failed (rc {r['rc']})")
        vs_floor = f"{r['wall_s'] / floor:.2f}x" if floor else ""
        vs_peft = f"{peft / r['wall_s']:.1f}x" if peft and key in ("merge_o", "inplace_first", "inplace", "pisa") else ""
        out.append(f"| {r['label']}{status} | {r['wall_s']:.1f} | {rate} | {r['peak_rss_mib']:.0f} | "
                   f"{r['written_bytes'] / 1e9:.2f} | {vs_floor} | {vs_peft} |")
    if pisa_floor:
        out.append(f"| floor for the PISA merge: read + write of its tensors | {pisa_floor:.1f} | | | | | |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
