"""Training step time and peak memory from SmolLM2-135M's shape up to ~1.5 B parameters: S2FT vs PEFT LoRA
vs full fine-tuning, and PISA vs LoRA vs FourierFT, side by side in one run.

    python bench/scale.py [--quick] [--shapes smollm2-135m,llama-400m,llama-1.5b] [--lengths 512,2048]
                          [--warmup 1] [--steps 4] [--json bench/results/scale.json]

Random-weight Llama models (``LlamaForCausalLM`` from a ``LlamaConfig``, transformers' own random
init, fp32 on CPU, bf16 on CUDA), one batch of random token ids, AdamW. Every contender of a shape and
length runs in a fresh process of its own (``--worker``), so that one's memory never counts for
another; they are built one after another, then stepped in turn, one step each per round, so that a
busy machine's drift hits them alike: the median of ``--steps`` timed steps (forward, backward,
optimizer step) after ``--warmup`` untimed rounds, and the peak RSS of each process (its own
``ru_maxrss``; ``max_memory_allocated`` on CUDA) with what training added to the built model. A
memory guard kills a contender that passes ``--memory`` (or what the machine has available), and
contenders that cannot fit are not started: full fine-tuning needs 16 bytes per parameter for the
weights, gradients and AdamW's two moments before any activation. The longest length runs only on
models up to ``--long-max-params`` and full fine-tuning only up to ``--full-max-params`` (time: on the
2-core development machine a 1.5 B step takes minutes).

S2FT: ``intermediate // 32`` FFN channels per layer trained in ``down_proj`` (the paper's choice on
GQA models), partial back-propagation. PEFT LoRA on ``down_proj`` with the rank whose trainable count
is nearest S2FT's. PISA at its defaults (every projection, 64x64 blocks, 32 coefficients per block)
against PEFT LoRA on the same seven projections and PEFT FourierFT on them, both matched to PISA's
count, on the first shape at the shortest length.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from measure import ROOT, MemoryGuard, available_mib, command_env, training_step_times

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, tie_word_embeddings=True)
SHAPES = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),  # --quick
    "smollm2-135m": SMOL,
    "llama-400m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=4, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "llama-1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=True),
}
COMMON = dict(vocab_size=49152, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN = ("s2reg-s2ft", "peft-lora", "full")
SPECTRAL = ("s2reg-pisa", "peft-lora-7", "peft-fourierft")
PISA_BLOCK, PISA_COEFFICIENTS = 64, 32  # PISAConfig's defaults, checked in the worker


def config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**COMMON, **SHAPES[shape])


def matrices(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of one decoder layer."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}


def total_params(cfg) -> int:
    h, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    per_layer = sum(o * i for o, i in matrices(cfg).values()) + 2 * h
    return v * h * (1 if cfg.tie_word_embeddings else 2) + layers * per_layer + h


def budgets(cfg) -> dict[str, dict]:
    """Each method's settings and its trainable parameter count, known before any model is built."""
    layers, mats = cfg.num_hidden_layers, matrices(cfg)
    channels = cfg.intermediate_size // 32
    s2ft = channels * cfg.hidden_size * layers
    down = sum(mats["down_proj"]) * layers
    r_down = max(1, round(s2ft / down))
    pisa = sum(-(-o // PISA_BLOCK) * -(-i // PISA_BLOCK) for o, i in mats.values()) * PISA_COEFFICIENTS * 2 * layers
    r_all = max(1, round(pisa / (sum(o + i for o, i in mats.values()) * layers)))
    n_frequency = round(pisa / (len(PROJECTIONS) * layers))
    return {
        "s2reg-s2ft": {"channels": channels, "trainable": s2ft},
        "peft-lora": {"r": r_down, "targets": ["down_proj"], "trainable": r_down * down},
        "full": {"trainable": total_params(cfg)},
        "s2reg-pisa": {"block": PISA_BLOCK, "coefficients": PISA_COEFFICIENTS, "trainable": pisa},
        "peft-lora-7": {"r": r_all, "targets": list(PROJECTIONS),
                        "trainable": r_all * sum(o + i for o, i in mats.values()) * layers},
        "peft-fourierft": {"n_frequency": n_frequency, "targets": list(PROJECTIONS),
                           "trainable": n_frequency * len(PROJECTIONS) * layers},
    }


def need_mib(method: str, cfg, tokens: int) -> float:
    """A floor on the memory a contender needs: fp32 weights (plus gradients and AdamW's two moments for
    full fine-tuning) and the logits of ``tokens`` (kept in fp32 for the loss, with their gradient)."""
    params = total_params(cfg)
    per_param = 16 if method == "full" else 4
    return (per_param * params + 3 * 4 * tokens * cfg.vocab_size) / 2**20


def prepare(model, method: str, b: dict):
    from peft import FourierFTConfig, LoraConfig, get_peft_model

    from s2reg.train import PISAConfig, S2FTConfig, prepare_pisa, prepare_s2ft

    if method == "s2reg-s2ft":
        prepare_s2ft(model, S2FTConfig(channels=b["channels"], heads=0, roles=("down",)))
    elif method == "s2reg-pisa":
        defaults = PISAConfig()
        assert (defaults.block, defaults.coefficients) == (b["block"], b["coefficients"]), "PISA's defaults moved"
        prepare_pisa(model, defaults)
    elif method.startswith("peft-lora"):
        model = get_peft_model(model, LoraConfig(r=b["r"], lora_alpha=2 * b["r"], target_modules=b["targets"]))
    elif method == "peft-fourierft":
        model = get_peft_model(model, FourierFTConfig(n_frequency=b["n_frequency"], target_modules=b["targets"]))
    return model


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def worker(method: str, shape: str, length: int, batch: int) -> None:
    """Build one contender, say so, then run one training step per ``step`` line on stdin and print its
    time; at ``end`` print the peak memory and exit."""
    import torch
    from transformers import LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cfg = config(shape)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    model = prepare(model.to(device), method, budgets(cfg)[method])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps({"trainable": sum(p.numel() for p in params), "build_s": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(json.dumps(training_step_times(model, optimizer, ids, 1, cuda, warmup=0)[0]), flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak, "train_mib": peak - before}), flush=True)


class Contender:
    """One method's worker process, under a memory guard."""

    def __init__(self, method: str, shape: str, length: int, args, limit: float):
        self.method, self.times, self.error = method, [], None
        argv = [sys.executable, __file__, "--worker", method, "--shapes", shape, "--lengths", str(length),
                "--batch", str(args.batch)]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=command_env())
        self.guard = MemoryGuard(self.proc.pid, limit)
        self.ready = self.answer()

    def answer(self):
        line = self.proc.stdout.readline() if self.error is None else ""
        if not line:
            self.guard.join()
            self.log.seek(0)
            tail = (self.log.read().strip().splitlines() or ["(no output)"])[-1][:300]
            self.error = self.error or (f"killed at {self.guard.killed_at / 1024:.1f} GiB RSS (limit "
                                        f"{self.guard.limit_mib / 1024:.1f} GiB)" if self.guard.killed_at else "failed: " + tail)
            return None
        return json.loads(line)

    def ask(self) -> None:
        if self.error is None:
            self.proc.stdin.write("step\n")
            self.proc.stdin.flush()

    def hear(self) -> None:
        t = self.answer()
        if t is not None:
            self.times.append(t)

    def end(self) -> dict:
        if self.error is None:
            self.proc.stdin.write("end\n")
            self.proc.stdin.flush()
            memory = self.answer()
        self.proc.stdin.close()
        self.proc.wait()
        self.guard.join()
        return memory if self.error is None else {}


def contend(methods, shape: str, length: int, args) -> list[dict]:
    """The ``methods`` on one shape and length: each in a fresh process of its own, all built first, then
    stepped in turn (the first of each round moving round), so that a busy machine's drift hits them
    alike: ``--warmup`` untimed rounds, then ``--steps`` timed ones."""
    cfg = config(shape)
    rows, live = {}, []
    for method in methods:
        base = {"method": method, "shape": shape, "length": length, "batch": args.batch, **budgets(cfg)[method],
                "params": total_params(cfg)}
        rows[method] = base
        need = need_mib(method, cfg, args.batch * length)
        limit = min(args.memory, available_mib() - 1024)
        if need > limit:
            base["skipped"] = f"does not fit: needs at least {need / 1024:.1f} GiB, {limit / 1024:.1f} GiB available"
        elif method == "full" and base["params"] > args.full_max_params:
            base["skipped"] = (f"not run: full fine-tuning above {args.full_max_params / 1e6:.0f} M parameters "
                               f"(--full-max-params), for time")
        else:
            print(f"  {shape} x {length}: building {method} ...", file=sys.stderr, flush=True)
            live.append(Contender(method, shape, length, args, limit))
    for r in range(args.warmup + args.steps if live else 0):
        if args.together:  # all at once, each under the same load
            for c in live:
                c.ask()
            for c in live:
                c.hear()
        for c in [] if args.together else live[r % len(live):] + live[:r % len(live)]:
            c.ask()
            c.hear()
        print(f"    round {r + 1}: " + ", ".join(f"{c.method} {c.times[-1]:.2f} s" for c in live if c.times and c.error is None),
              file=sys.stderr, flush=True)
    for c in live:
        memory = c.end()
        row = rows[c.method]
        if c.error:
            row["skipped"] = c.error
            continue
        timed = c.times[args.warmup:]
        row.update(trainable=c.ready["trainable"], build_s=c.ready["build_s"], step_s=timed,
                   median_step_s=statistics.median(timed), **memory)
    return list(rows.values())


def ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}x" if key in a and key in b else "—"


def cell(r: dict, key: str, fmt: str) -> str:
    return format(r[key], fmt) if key in r else "—"


def report(rows: list[dict], memory_key: str) -> str:
    """Markdown: one line per (shape, length) with S2FT, LoRA and full side by side; the PISA rows."""
    out = ["| shape | params | tokens | S2FT / LoRA trainable | S2FT step s | LoRA step s | full step s | "
           "S2FT / LoRA time | S2FT / full time | S2FT MiB | LoRA MiB | full MiB | S2FT / LoRA memory | "
           "S2FT / full memory |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["shape"], r["length"], r["method"]): r for r in rows}
    for shape, length in dict.fromkeys((r["shape"], r["length"]) for r in rows if r["method"] in TRAIN):
        s, lo, fu = (by.get((shape, length, m), {}) for m in TRAIN)
        out.append(f"| {shape} | {s['params'] / 1e6:,.0f} M | {s['batch']} x {length} | "
                   f"{s['trainable']:,} / {lo['trainable']:,} (r={lo['r']}) | {cell(s, 'median_step_s', '.2f')} | "
                   f"{cell(lo, 'median_step_s', '.2f')} | {cell(fu, 'median_step_s', '.2f')} | "
                   f"{ratio(s, lo, 'median_step_s')} | {ratio(s, fu, 'median_step_s')} | {cell(s, memory_key, '.0f')} | "
                   f"{cell(lo, memory_key, '.0f')} | {cell(fu, memory_key, '.0f')} | {ratio(s, lo, memory_key)} | "
                   f"{ratio(s, fu, memory_key)} |")
    notes = [f"- {r['shape']} x {r['length']}, {r['method']}: {r['skipped']}" for r in rows if "skipped" in r]
    spectral = [r for r in rows if r["method"] in SPECTRAL]
    if spectral:
        pisa = next((r for r in spectral if r["method"] == "s2reg-pisa"), {})
        out += ["", f"| method ({spectral[0]['shape']}) | tokens | trainable | step s | PISA / it time | peak MiB | "
                    "PISA / it memory |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in spectral:
            setting = {"s2reg-pisa": "64x64 blocks, 32 coefficients, every projection",
                       "peft-lora-7": f"r={r.get('r')}, every projection",
                       "peft-fourierft": f"n_frequency={r.get('n_frequency')}, every projection"}[r["method"]]
            out.append(f"| {r['method']} ({setting}) | {r['batch']} x {r['length']} | {r['trainable']:,} | "
                       f"{cell(r, 'median_step_s', '.2f')} | {ratio(pisa, r, 'median_step_s')} | "
                       f"{cell(r, memory_key, '.0f')} | {ratio(pisa, r, memory_key)} |")
    return "\n".join(out + ([""] + notes if notes else []))


def save(args, rows: list[dict], **about) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **about,
            "argv": sys.argv[1:], "rows": rows}, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a 2-layer model, 64 tokens, 1+2 steps")
    parser.add_argument("--shapes", default="smollm2-135m,llama-400m,llama-1.5b")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--long-max-params", type=float, default=200e6,
                        help="the longest length only on models up to this many parameters (time)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--full-max-params", type=float, default=600e6)
    parser.add_argument("--memory", type=float, default=22 * 1024, help="MiB a contender may use")
    parser.add_argument("--together", action="store_true",
                        help="step the contenders of a round at the same time instead of in turn (on a machine "
                             "shared with other work, where each then takes a larger share of it)")
    parser.add_argument("--no-spectral", action="store_true", help="skip PISA vs LoRA vs FourierFT")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--worker", choices=TRAIN + SPECTRAL, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.lengths, args.warmup, args.steps = "tiny", "64", 1, 2
    shapes, lengths = args.shapes.split(","), [int(n) for n in args.lengths.split(",")]
    if args.worker:
        return worker(args.worker, shapes[0], lengths[0], args.batch)
    started = time.perf_counter()
    rows = []
    for shape in shapes:
        for length in lengths:
            if length == max(lengths) and len(lengths) > 1 and total_params(config(shape)) > args.long_max_params:
                continue
            rows += contend(TRAIN, shape, length, args)
            if shape == shapes[0] and length == min(lengths) and not args.no_spectral:
                rows += contend(SPECTRAL, shape, length, args)
            save(args, rows)
    import torch

    device = f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), fp32"
    memory_key = "peak_mib"
    table = report(rows, memory_key)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--short", "s2reg"], capture_output=True, text=True).stdout.split()
    print(f"\n{device}; batch {args.batch}; median of {args.steps} steps after {args.warmup} warm-up, "
          f"{'stepped together' if args.together else 'stepped in turn'}; "
          f"peak memory = peak RSS of the contender's own process (CUDA: max_memory_allocated); "
          f"s2reg at {commit}{' with uncommitted changes to ' + ' '.join(dirty[1::2]) if dirty else ''}; "
          f"run took {(time.perf_counter() - started) / 60:.1f} min\n")
    print(table)
    save(args, rows, device=device, commit=commit, uncommitted_s2reg=dirty[1::2], minutes=(time.perf_counter() - started) / 60)


if __name__ == "__main__":
    main()
