"""Tuning quality on SmolLM2-135M as fronts: held-out accuracy against forgetting across learning rates,
one curve per method.

    python bench/quality.py                  # run the grid (hours on 2 cores; resumable: finished points are skipped)
    python bench/quality.py --report         # the table, bench/results/quality-fronts.{json,png}, from the points there are
    python bench/quality.py --plan           # the points still to run, in the order they will run
    python bench/quality.py --quick          # a few minutes: S2FT-R and PEFT LoRA, two rates, 12 steps, skill only
    python bench/quality.py --methods "pisa:roles=q+v" --lrs 3e-4 1e-3 --steps 20   # a study of its own

Every point is one (method, learning rate, task, seed, steps) run of s2reg's own loop
(``s2reg.train.loop.train``: AdamW, linear decay, clipping 1.0, batch 8) on the same examples in the same
order, so only the method and its learning rate differ. Each point is one JSON file in ``--out``
(default bench/results/quality/), written atomically when the run ends, with the machine, the date and
the load average it ran under; a rerun skips the points whose file exists, so the grid can be stopped
and continued any time, in a later session from the committed files.

Methods (``GRID``, in the order of what decides the defaults): S2FT-R at the trainer's defaults (32
``down`` channels per layer) and PEFT LoRA at PEFT's defaults (r=8, alpha 8, on q and v) first, then
PISA at the trainer's defaults, then S2FT random and weight selection at 2,764,800 parameters as 160
channels or 1 ``o`` head + 96 channels per layer, PEFT LoRA matched to that count on all seven
projections (r=9, alpha 2r), and full fine-tuning. Each at five log-spaced learning rates (``LRS``).
Order, group by group: seed 0 of every point (the rates from the middle out), then seeds 1 and 2 at each
front's knee (``knee``). Several runs may share one ``--out`` (one per core): each point is claimed with
a lock that dies with its process. A method spec can carry options (``Method.parse``), e.g.
``pisa:roles=q+v,coefficients=426,scale=40.96``, ``pisa:positions=low``, ``fourierft:init=zero``.

Tasks (fixtures/quality_tasks.py): ``skill`` (reverse 4-digit numbers; shifted: 5 and 6 digits) and
``facts`` (invented club mascots in two phrasings; shifted: two phrasings never trained on). Measures:
greedy exact-match accuracy on the held-out and on the shifted records; forgetting as the rise of the
NLL per token of English prose in no training set here (the history section of this Python's
LICENSE.txt, 512 tokens), and agreement with the base model's greedy next token on its own 12-token
continuations of 16 unrelated prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures.quality_tasks import TASKS, matches  # noqa: E402
from s2reg.fsatomic import write_file  # noqa: E402
from s2reg.train.data import tokenize  # noqa: E402
from s2reg.train.loop import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BATCH = 8

# ------------------------------------------------------------------------------------------ the grid

# Groups in the order of what decides the defaults; within a group the methods run side by side.
GRID = (
    ("s2ft-R", "lora"),
    ("pisa",),
    ("s2ft-R:channels=160", "s2ft-R:heads=1,channels=96,roles=o+down", "lora:targets=all"),
    ("s2ft-W:channels=160", "s2ft-W:heads=1,channels=96,roles=o+down", "full"),
)
LABELS = {
    "s2ft-R": "S2FT-R, 32 down channels (default)",
    "lora": "PEFT LoRA defaults (r=8, q+v)",
    "pisa": "PISA (default)",
    "s2ft-R:channels=160": "S2FT-R, 160 channels",
    "s2ft-R:heads=1,channels=96,roles=o+down": "S2FT-R, 1 head + 96 channels",
    "lora:targets=all": "PEFT LoRA r=9, all projections",
    "s2ft-W:channels=160": "S2FT-W, 160 channels",
    "s2ft-W:heads=1,channels=96,roles=o+down": "S2FT-W, 1 head + 96 channels",
    "full": "full fine-tuning",
}
SPREAD = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]  # two decades around the adapters' working rates
LRS = {"s2ft": SPREAD, "pisa": SPREAD, "lora": SPREAD, "fourierft": SPREAD, "full": [3e-6, 1e-5, 3e-5, 1e-4, 3e-4]}
STEPS = 100
SEEDS = 3
# The trainer's per-step cap is off: a front shows what the learning rate does, and PEFT's methods have no
# cap. ``large_steps`` then counts the steps past change.STEP_LIMIT, so a default can be checked to run
# clear of the cap.
STEP_CAP = 0.0

# The size S2FT's larger variants and the matched LoRA share: 160 down channels x 30 layers = 1 o head
# + 96 down channels per layer = PEFT LoRA r=9 on all seven projections (within 1%).
BUDGET = 2_764_800


@dataclass(frozen=True)
class Method:
    spec: str          # as given, e.g. "s2ft-R:channels=160"
    kind: str          # s2ft | pisa | lora | fourierft | full
    options: dict

    @staticmethod
    def parse(spec: str) -> "Method":
        base, _, rest = spec.partition(":")
        options = dict(item.split("=", 1) for item in rest.split(",") if item)
        kind, strategy = (base.split("-", 1) + [None])[:2]
        if kind not in LRS:
            raise SystemExit(f"unknown method {spec!r} (s2ft-R|W|A|S|G, pisa, lora, fourierft, full, with :options)")
        if strategy:
            options.setdefault("strategy", STRATEGY_LETTERS[strategy])
        return Method(spec, kind, options)

    @property
    def label(self) -> str:
        return LABELS.get(self.spec, self.spec)


STRATEGY_LETTERS = {"R": "random", "W": "weight", "A": "activation", "S": "weight_activation", "G": "gradient"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Point:
    method: str
    task: str
    lr: float
    seed: int
    steps: int

    @property
    def filename(self) -> str:
        slug = "".join(c if c.isalnum() or c in "-." else "_" for c in self.method)
        return f"{slug}__{self.task}__lr{self.lr:g}__seed{self.seed}__steps{self.steps}.json"

    @staticmethod
    def of(record: dict) -> "Point":
        return Point(record["method"], record["task"], record["lr"], record["seed"], record["steps"])


def middle_out(lrs: list[float]) -> list[float]:
    """The rates from the middle outwards, the higher side first: the likely knee before the extremes."""
    middle = len(lrs) // 2
    order = [middle]
    for step in range(1, len(lrs)):
        order += [i for i in (middle + step, middle - step) if 0 <= i < len(lrs)]
    return [lrs[i] for i in order]


def knee(points: list[dict]) -> int:
    """Index (in ``points``, sorted by lr) of a front's knee: the most accuracy for the least forgetting,
    as the largest normalised accuracy minus normalised prose-NLL rise (Kneedle's distance above the
    chord, both axes scaled to the front's own range)."""
    def scaled(values):
        low, high = min(values), max(values)
        return [(v - low) / (high - low) if high > low else 0.0 for v in values]

    gain = scaled([p["accuracy"] for p in points])
    cost = scaled([p["prose_rise"] for p in points])
    return max(range(len(points)), key=lambda i: (gain[i] - cost[i], gain[i]))


def schedule(groups, tasks: list[str], steps: int, seeds: int, done: dict[Point, dict],
             lrs: list[float] | None = None) -> list[Point]:
    """Every point still to run, in order, group by group: seed 0 (rates middle-out, then task, then method),
    then the other seeds at each front's knee, so the groups that decide the defaults finish first. A
    front's extra seeds are scheduled once its seed-0 points are all done (the knee is read from them)."""
    queue = []
    for group in groups:
        first, extra = [], []
        methods = [Method.parse(spec) for spec in group]
        grid = {m.spec: lrs or LRS[m.kind] for m in methods}
        for rank in range(max(len(v) for v in grid.values())):
            for task in tasks:
                for m in methods:
                    order = middle_out(grid[m.spec])
                    if rank < len(order):
                        first.append(Point(m.spec, task, order[rank], 0, steps))
        for m in methods:
            for task in tasks:
                front = [done.get(Point(m.spec, task, lr, 0, steps)) for lr in sorted(grid[m.spec])]
                if None in front:
                    continue
                lr = front[knee(front)]["lr"]
                extra += [Point(m.spec, task, lr, seed, steps) for seed in range(1, seeds)]
        queue += first + extra
    return [p for p in queue if p not in done]


def claim(out: Path, point: Point) -> int | None:
    """A descriptor holding ``point``'s lock, or None when another process runs it; the lock is released
    when the descriptor closes or the process dies."""
    import fcntl

    claims = out / ".claims"
    claims.mkdir(exist_ok=True)
    fd = os.open(claims / point.filename, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def read_points(directory: Path) -> dict[Point, dict]:
    points = {}
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        if path.name == BASE_FILE:
            continue
        record = json.loads(path.read_text())
        points[Point.of(record)] = record
    return points


# ------------------------------------------------------------------------------------------- methods

def prepare(model, method: Method, seed: int, calibration):
    """The model to train (PEFT wraps it) and its trainable parameter count."""
    from peft import FourierFTConfig, LoraConfig, get_peft_model

    from s2reg.train import PISAConfig, S2FTConfig, prepare_pisa, prepare_s2ft

    o = dict(method.options)
    if method.kind == "s2ft":
        sizes = {k: int(o[k]) for k in ("channels", "heads") if k in o}
        roles = tuple(o["roles"].split("+")) if "roles" in o else None
        config = S2FTConfig(strategy=o.get("strategy", "random"), seed=seed, roles=roles, **sizes)
        return model, prepare_s2ft(model, config, calibration=calibration).num_trainable
    if method.kind == "pisa":
        kwargs = {k: (float(v) if k == "scale" else int(v)) for k, v in o.items() if k in ("scale", "block", "coefficients")}
        if "roles" in o:
            kwargs["roles"] = tuple(o["roles"].split("+"))
        prepared = prepare_pisa(model, PISAConfig(seed=seed, **kwargs))
        if o.get("positions") == "low":
            draw_low_frequencies(model)
        return model, prepared.num_trainable
    if method.kind == "lora":
        if o.get("targets") == "all":  # the rank whose count is nearest BUDGET, PEFT's usual alpha = 2r
            per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules() if n.split(".")[-1] in LORA_TARGETS)
            rank = max(1, round(BUDGET / per_rank))
            config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
        else:
            config = LoraConfig()  # PEFT's own defaults: r=8, alpha 8, its q/v targets for Llama
        model = get_peft_model(model, config)
    elif method.kind == "fourierft":
        layers = model.config.num_hidden_layers
        model = get_peft_model(model, FourierFTConfig(n_frequency=BUDGET // (2 * layers), target_modules=["q_proj", "v_proj"],
                                                      random_loc_seed=seed, scaling=float(o.get("scaling", 150.0)),
                                                      init_weights=o.get("init", "random") == "zero"))
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def draw_low_frequencies(model) -> None:
    """The study's alternative to the trainer's uniform draw: in every block, the coefficients' positions
    are the lowest frequencies (smallest ``|u|^2 + v^2``, ``u`` taken signed); the adapter stores them as it
    stores any positions (FORMAT §5.4)."""
    from s2reg.train.pisa.layer import canonical_positions, is_attached

    for module in model.modules():
        if not is_attached(module):
            continue
        (bh, bw), (blocks, k) = module.pisa_block, module.pisa_indices.shape
        offered = canonical_positions((bh, bw))
        u, v = offered // (bw // 2 + 1), offered % (bw // 2 + 1)
        radius = torch.minimum(u, bh - u) ** 2 + v ** 2
        lowest = offered[torch.argsort(radius, stable=True)[:k]].sort().values
        module.pisa_indices = lowest.expand(blocks, k).clone()


PEFT_KINDS = ("lora", "fourierft")


def relative_change(model, before: dict[str, torch.Tensor]) -> float:
    """||W' - W|| / ||W|| over the weights a PEFT adapter changed (merged), as the trainer reports for its own."""
    num = den = 0.0
    for name, p in model.named_parameters():
        old = before[name]
        diff = float((p.detach() - old).double().pow(2).sum())
        if diff:
            num += diff
            den += float(old.double().pow(2).sum())
    return math.sqrt(num / den) if den else 0.0


# ------------------------------------------------------------------------------------------ measures

UNRELATED = ["The capital of France is", "Water boils at a temperature of", "The first president of the United States was",
             "A good way to start the day is", "def fibonacci(n):", "The largest planet in the solar system is",
             "Once upon a time, in a small village,", "To make a cup of tea, you", "The chemical symbol for gold is",
             "In 1969, astronauts", "The best thing about summer is", "Photosynthesis is the process by which",
             "My favourite book is", "import numpy as np\n", "The Great Wall of China", "Shakespeare wrote"]


def prose_text() -> str:
    """The history section of the LICENSE.txt shipped with this Python: plain English, in no training set here."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    return text[:text.index("B. TERMS AND CONDITIONS")]


def greedy(model, tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [row[batch["input_ids"].shape[1]:].tolist() for row in out]


def accuracy(model, tokenizer, records: list[dict]) -> float:
    right = 0
    for start in range(0, len(records), 16):
        chunk = records[start:start + 16]
        width = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in chunk) + 1
        for record, ids in zip(chunk, greedy(model, tokenizer, [r["prompt"] for r in chunk], width), strict=True):
            right += matches(tokenizer.decode(ids, skip_special_tokens=True), record["completion"])
    return right / len(records)


def accuracies(model, tokenizer, task) -> dict:
    """In-domain accuracy, the shifted subsets' accuracies and their mean (every subset is the same size)."""
    shifted = {name: accuracy(model, tokenizer, records) for name, records in task.shifted.items()}
    return {"accuracy": accuracy(model, tokenizer, task.held), "shifted_accuracy": statistics.mean(shifted.values()),
            "shifted": shifted}


def prose_nll(model, prose_ids: torch.Tensor) -> float:
    with torch.no_grad():
        chunks = prose_ids.reshape(-1, 128)
        return float(model(input_ids=chunks, labels=chunks).loss)


def agreement(model, references: list[tuple[torch.Tensor, int]]) -> float:
    """Share of positions where the model's greedy next token is the base model's (teacher-forced on the base's)."""
    same = total = 0
    with torch.no_grad():
        for ids, prompt_len in references:
            predicted = model(input_ids=ids[None]).logits[0, prompt_len - 1:-1].argmax(-1)
            same += int((predicted == ids[prompt_len:]).sum())
            total += ids.numel() - prompt_len
    return same / total


def code_version() -> str:
    """The commit the bench runs from (``-dirty``: the checkout has uncommitted changes, anyone's)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def circumstances() -> dict:
    """Where and under what load a point ran: the machine, the UTC time, the 1-minute load average."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load": round(os.getloadavg()[0], 2), "code": CODE}


# ---------------------------------------------------------------------------------------------- runs

BASE_FILE = "base.json"
CODE = code_version()


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class Bench:
    def __init__(self, prose_tokens: int, out: Path):
        """The base model's measures, kept in ``out/base.json`` so that later invocations skip them."""
        from transformers import AutoTokenizer

        from fixtures.smollm2 import build_smollm2

        self.path = build_smollm2()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tasks = {name: make() for name, make in TASKS.items()}
        ids = self.tokenizer(prose_text())["input_ids"]
        self.prose = torch.tensor(ids[:prose_tokens])
        cache = out / BASE_FILE
        base = json.loads(cache.read_text()) if cache.exists() else {}
        if base.get("prose_tokens") != len(self.prose):
            base = self.measure_base()
            write_file(cache, (json.dumps(base) + "\n").encode(), mode=0o644)
        self.base = base
        self.references = [(torch.tensor(ids), n) for ids, n in base["references"]]

    def measure_base(self) -> dict:
        base = load(self.path).eval()
        references = []
        for prompt, ids in zip(UNRELATED, greedy(base, self.tokenizer, UNRELATED, 12), strict=True):
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            references.append((prompt_ids + ids, len(prompt_ids)))
        return {"prose_tokens": len(self.prose), "prose_nll": prose_nll(base, self.prose), "references": references,
                "tasks": {name: accuracies(base, self.tokenizer, task) for name, task in self.tasks.items()}}

    def run(self, point: Point) -> dict:
        method, task = Method.parse(point.method), self.tasks[point.task]
        before_run = circumstances()
        examples = tokenize(task.train, self.tokenizer, 64)
        random.Random(point.seed).shuffle(examples)
        model = load(self.path)
        calibration = None
        if method.options.get("strategy") in ("activation", "weight_activation", "gradient"):
            from s2reg.train.data import collate

            calibration = [collate(examples[i:i + BATCH], self.tokenizer.pad_token_id) for i in range(0, 32, BATCH)]
        torch.manual_seed(point.seed)
        before = {n: p.detach().clone() for n, p in model.named_parameters()} if method.kind in PEFT_KINDS else {}
        model, trainable = prepare(model, method, point.seed, calibration)
        warnings: list[str] = []
        started = time.perf_counter()
        result = train(model, examples, TrainConfig(max_steps=point.steps, epochs=100, batch_size=BATCH, lr=point.lr,
                                                    seed=point.seed, max_step_change=STEP_CAP),
                       pad_id=self.tokenizer.pad_token_id, on_warning=warnings.append)
        trained = time.perf_counter()
        model.eval()
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        change = relative_change(merged, before) if merged is not model else result.weight_change
        record = {"method": point.method, "label": method.label, "kind": method.kind, "task": point.task,
                  "seed": point.seed, "steps": point.steps, "lr": point.lr, "trainable": trainable,
                  "first_loss": result.losses[0], "final_loss": result.losses[-1],
                  **accuracies(merged, self.tokenizer, task),
                  "prose_nll": prose_nll(merged, self.prose), "agreement": agreement(merged, self.references),
                  "relative_change": change, "max_step_change": STEP_CAP,
                  "large_steps": result.large_steps if merged is model else None,
                  "warnings": warnings[:1], "train_seconds": round(trained - started, 1),
                  "eval_seconds": round(time.perf_counter() - trained, 1),
                  "base": {"prose_nll": self.base["prose_nll"], **self.base["tasks"][point.task]},
                  "started": before_run, "finished": circumstances()}
        record["prose_rise"] = record["prose_nll"] - self.base["prose_nll"]
        return record


# ------------------------------------------------------------------------------------------- reports

def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def fronts(points: list[dict]) -> list[dict]:
    """One row per (method, task, lr): the mean and half the min-max spread over its seeds."""
    rows: dict[tuple, list[dict]] = {}
    for p in points:
        rows.setdefault((p["method"], p["task"], p["lr"]), []).append(p)
    out = []
    for (method, task, lr), mine in rows.items():
        row = {"method": method, "label": Method.parse(method).label, "task": task, "lr": lr,
               "trainable": mine[0]["trainable"], "seeds": sorted(p["seed"] for p in mine)}
        for key in ("accuracy", "shifted_accuracy", "prose_rise", "agreement"):
            values = [p[key] for p in mine]
            row[key], row[key + "_spread"] = statistics.mean(values), spread(values)
        out.append(row)
    order = {spec: i for i, spec in enumerate(s for group in GRID for s in group)}
    return sorted(out, key=lambda r: (r["task"], order.get(r["method"], len(order)), r["method"], r["lr"]))


def coverage(points: list[dict], steps: int, tasks: list[str]) -> dict:
    """How much of the default grid the points cover, and under what circumstances they ran."""
    grid_first = schedule(GRID, tasks, steps, SEEDS, {})
    have = {Point.of(p) for p in points}
    runs = [p["started"] for p in points] + [p["finished"] for p in points]
    return {"points": len(points), "grid_seed0_done": sum(p in have for p in grid_first), "grid_seed0_total": len(grid_first),
            "extra_seeds": sum(p["seed"] > 0 for p in points), "steps": steps,
            "machines": sorted({f"{r['host']} ({r['cpu']}, {r['cores']} cores, torch {r['torch']}, {r['threads']} thread)"
                                for r in runs}),
            "code": sorted({r.get("code", "unknown") for r in runs}),
            "from": min((r["utc"] for r in runs), default=None), "to": max((r["utc"] for r in runs), default=None),
            "load": [min((r["load"] for r in runs), default=None), max((r["load"] for r in runs), default=None)]}


def markdown(rows: list[dict], cover: dict, base: dict | None) -> str:
    partial = cover["grid_seed0_done"] < cover["grid_seed0_total"]
    lines = [f"{'PARTIAL: ' if partial else ''}{cover['points']} points: {cover['grid_seed0_done']} of the grid's "
             f"{cover['grid_seed0_total']} seed-0 points, {cover['extra_seeds']} extra-seed points; {cover['steps']} steps "
             f"of batch {BATCH}; run {cover['from']} to {cover['to']} UTC on {'; '.join(cover['machines'])}, "
             f"1-minute load {cover['load'][0]}-{cover['load'][1]}, code {', '.join(cover['code'])}."]
    if base:
        lines.append(f"Base: prose NLL {base['prose_nll']:.3f}; " + "; ".join(
            f"{task} {t['accuracy']:.1%} held-out, {t['shifted_accuracy']:.1%} shifted" for task, t in base["tasks"].items()))
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += ["", f"**{task}**", "", "| method | trainable | lr | held-out acc % | shifted acc % | prose rise | base agree % | seeds |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["task"] == task):
            cells = [r["label"], f"{r['trainable']:,}", f"{r['lr']:g}"]
            for key, factor, fmt in (("accuracy", 100, "{:.1f}"), ("shifted_accuracy", 100, "{:.1f}"),
                                     ("prose_rise", 1, "{:+.3f}"), ("agreement", 100, "{:.1f}")):
                value = fmt.format(r[key] * factor)
                cells.append(value + (" ± " + fmt.format(r[key + "_spread"] * factor).lstrip("+") if len(r["seeds"]) > 1 else ""))
            cells.append(str(len(r["seeds"])))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RISE_TICKS = [0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]


def plot(rows: list[dict], cover: dict, path: Path) -> None:
    """Held-out (top) and shifted (bottom) accuracy against the prose-NLL rise, a panel per task, a curve
    per method joining its learning rates in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    figure, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 9), squeeze=False)
    for column, task in enumerate(tasks):
        for row, (key, what) in enumerate((("accuracy", "held-out"), ("shifted_accuracy", "shifted (out-of-domain)"))):
            ax = axes[row][column]
            for m in methods:
                mine = sorted((r for r in rows if r["task"] == task and r["method"] == m), key=lambda r: r["lr"])
                if not mine:
                    continue
                xs, ys = [r["prose_rise"] for r in mine], [100 * r[key] for r in mine]
                style = "-" if m.startswith("s2ft") else "--"
                ax.plot(xs, ys, style, marker="o", color=colours[m], label=mine[0]["label"])
                for r, x, y in zip(mine, xs, ys, strict=True):
                    ax.annotate(f"{r['lr']:g}", (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
            rises = [r["prose_rise"] for r in rows if r["task"] == task]
            ax.set_xscale("symlog", linthresh=0.05)  # linear near no forgetting, logarithmic past it
            right = max(0.1, 1.3 * max(rises))
            ax.set_xlim(min(0.0, min(rises)) - 0.005, right)
            ax.set_xticks([t for t in RISE_TICKS if t <= right])
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_ylim(-3, 103)
            ax.set_xlabel("prose NLL rise (nats; forgetting)")
            ax.set_ylabel(f"{what} accuracy %")
            ax.set_title(f"{task}: {what}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    partial = " (partial grid)" if cover["grid_seed0_done"] < cover["grid_seed0_total"] else ""
    figure.suptitle(f"SmolLM2-135M, {cover['steps']} steps: {cover['points']} points{partial}; labels: learning rate")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(out: Path, steps: int, tasks: list[str], stem: Path) -> str:
    points = [p for p in read_points(out).values() if p["steps"] == steps]
    if not points:
        raise SystemExit(f"no {steps}-step points in {out}")
    rows, cover = fronts(points), coverage(points, steps, tasks)
    base_path = out / BASE_FILE
    base = json.loads(base_path.read_text()) if base_path.exists() else None
    text = markdown(rows, cover, base)
    write_file(stem.with_suffix(".json"), (json.dumps({"coverage": cover, "fronts": rows}, indent=1) + "\n").encode(), mode=0o644)
    plot(rows, cover, stem.with_suffix(".png"))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S2FT-R and PEFT LoRA, lr 1e-3 and 1e-2, 12 steps, skill, one seed")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seeds at each front's knee (seed 0 everywhere)")
    parser.add_argument("--methods", nargs="+", help="method specs, one group (default: the grid, GRID)")
    parser.add_argument("--lrs", type=float, nargs="+", help="these rates for every method (default: LRS by kind)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--limit", type=int, help="run at most this many points, then stop")
    parser.add_argument("--plan", action="store_true", help="print the points still to run, in order, and stop")
    parser.add_argument("--report", action="store_true", help="only write the table and the plot of the points there are")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="the points' directory (default bench/results/quality; "
                                                  "bench/out/quality-quick with --quick)")
    args = parser.parse_args()
    groups = (tuple(args.methods),) if args.methods else GRID
    if args.quick:
        groups, args.lrs, args.steps, args.seeds, args.tasks = (("s2ft-R", "lora"),), [1e-3, 1e-2], 12, 1, ["skill"]
    out = args.out or (ROOT / "bench" / "out" / "quality-quick" if args.quick else RESULTS / "quality")
    stem = out.parent / f"{out.name}-fronts"
    if args.report:
        print(report(out, args.steps, args.tasks, stem))
        return
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    done = read_points(out)
    if args.plan:
        for point in schedule(groups, args.tasks, args.steps, args.seeds, done, args.lrs):
            print(point.method, point.task, f"{point.lr:g}", point.seed, point.steps)
        return
    bench = Bench(256 if args.quick else 512, out)
    print(f"base: prose NLL {bench.base['prose_nll']:.3f}, tasks {bench.base['tasks']}", flush=True)
    ran = 0
    while args.limit is None or ran < args.limit:
        todo = schedule(groups, args.tasks, args.steps, args.seeds, done, args.lrs)  # again: knees come from new points
        if not todo:
            break
        claimed = next(((p, lock) for p in todo if (lock := claim(out, p))), None)
        if claimed is None:
            break  # the rest is being run by other processes
        point, lock = claimed
        if (out / point.filename).exists():  # finished by another process since this one read the directory
            done[point] = json.loads((out / point.filename).read_text())
            os.close(lock)
            continue
        record = bench.run(point)
        write_file(out / point.filename, (json.dumps(record, indent=1) + "\n").encode(), mode=0o644)
        os.close(lock)
        done.update(read_points(out))
        done[point] = record
        ran += 1
        print(f"[{len(todo) - 1} left] {point.method} {point.task} lr={point.lr:g} seed={point.seed}: "
              f"acc {record['accuracy']:.1%} shifted {record['shifted_accuracy']:.1%} rise {record['prose_rise']:+.3f} "
              f"({record['train_seconds']:.0f}+{record['eval_seconds']:.0f} s, load {record['started']['load']})", flush=True)
    print(report(out, args.steps, args.tasks, stem))


if __name__ == "__main__":
    main()
