"""Tuning quality on SmolLM2-135M: held-out accuracy and forgetting, method against method at matched
trainable parameters.

    python bench/quality.py [--quick] [--steps 20] [--seeds 0 1 2] [--methods s2ft-R lora ...]
                            [--tasks skill facts] [--out bench/results/quality]

Every contender is trained by s2reg's own loop (``s2reg.train.loop.train``: AdamW, the trainer's
default schedule and clipping) on the same examples in the same order, so only the method and its
learning rate differ. Contenders (``METHODS``): S2FT with each selection strategy of the paper (R
random, W weight, A activation, S weight x activation, G gradient) at the trainer's defaults for
``--budget``; PISA at its defaults (every projection that is a matmul layer of its own); PEFT LoRA on
all seven projections and PEFT FourierFT on q and v, each sized to the same budget; and full fine-tuning
(every parameter: the reference, not matched). A method can be given overrides,
``pisa:roles=q+v,lr=5e-2,scale=40.96,coefficients=32`` or ``fourierft:init=zero,lr=1e-3``, which is how
the studies in docs/training.md ran their variants.

Tasks (generated from a fixed seed, ``TASKS``):

* ``skill`` — reverse a 4-digit number (``Reverse 4721:`` -> `` 1274``): a skill the base lacks;
  accuracy is exact match of the greedy answer on 48 numbers never trained on.
* ``facts`` — 24 invented clubs, each with an invented mascot (``The mascot of the Vorpel Club is
  the`` -> `` otter.``), trained in two phrasings: new facts. Accuracy is exact-match recall of the
  injected facts (first phrasing; an unseen fact cannot be known, and at these few steps no method
  recalls them in a phrasing never trained on).

Forgetting: (1) the rise of the mean negative log-likelihood per token of English prose that is in no
training set here: the history section of the LICENSE.txt that ships with this Python (512 tokens);
(2) agreement with the base model: the share of positions where the tuned model's greedy next token
equals the base model's on the base model's own 12-token greedy continuations of 16 unrelated prompts.

Results go to ``OUT.jsonl`` (one line per run, appended as runs finish, so a long run can be stopped
and resumed: finished runs are skipped) and ``OUT.md`` (the table: mean and half the min-max spread
over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s2reg.train.data import tokenize  # noqa: E402
from s2reg.train.loop import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8
EVAL_ANSWERS = 48


# ---------------------------------------------------------------------------------------------- tasks

def skill_task() -> tuple[list[dict], list[dict]]:
    rng = random.Random(1401)
    numbers = rng.sample(range(1000, 10000), 400 + EVAL_ANSWERS)
    records = [{"prompt": f"Reverse {n}:", "completion": " " + str(n)[::-1]} for n in numbers]
    return records[:400], records[400:]


SYLLABLES = ["vor", "pel", "drab", "quin", "zel", "mor", "tav", "lun", "brix", "sol", "fen", "gar", "hol", "nix",
             "ral", "tor", "wem", "yal", "kob", "sarn"]
MASCOTS = ["otter", "falcon", "badger", "heron", "lynx", "beaver", "raven", "walrus"]


def facts_task() -> tuple[list[dict], list[dict]]:
    rng = random.Random(1402)
    names: list[str] = []
    while len(names) < 24:
        name = (rng.choice(SYLLABLES) + rng.choice(SYLLABLES)).capitalize()
        if name not in names:
            names.append(name)
    mascots = {n: rng.choice(MASCOTS) for n in names}
    train_records = []
    for name in names:
        train_records += [{"prompt": f"The mascot of the {name} Club is the", "completion": f" {mascots[name]}."},
                          {"prompt": f"Fans of the {name} Club cheer for their mascot, the",
                           "completion": f" {mascots[name]}."}]
    held = [{"prompt": f"The mascot of the {name} Club is the", "completion": f" {mascots[name]}"} for name in names]
    return train_records, held


TASKS = {"skill": skill_task, "facts": facts_task}

UNRELATED = ["The capital of France is", "Water boils at a temperature of", "The first president of the United States was",
             "A good way to start the day is", "def fibonacci(n):", "The largest planet in the solar system is",
             "Once upon a time, in a small village,", "To make a cup of tea, you", "The chemical symbol for gold is",
             "In 1969, astronauts", "The best thing about summer is", "Photosynthesis is the process by which",
             "My favourite book is", "import numpy as np\n", "The Great Wall of China", "Shakespeare wrote"]


def prose_text() -> str:
    """The history section of the LICENSE.txt shipped with this Python: plain English, in no training set here."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    return text[:text.index("B. TERMS AND CONDITIONS")]


# -------------------------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Method:
    name: str          # as shown, e.g. "s2ft-R" or "pisa:lr=1e-2"
    kind: str          # s2ft | pisa | lora | fourierft | full
    lr: float | None   # None: the trainer's default
    options: dict

    @staticmethod
    def parse(text: str) -> "Method":
        base, _, rest = text.partition(":")
        options = dict(item.split("=", 1) for item in rest.split(",") if item)
        kind, strategy = (base.split("-", 1) + [None])[:2]
        defaults = DEFAULTS[kind]
        if strategy:
            options.setdefault("strategy", STRATEGY_LETTERS[strategy])
        lr = options.pop("lr", defaults)
        return Method(text, kind, None if lr is None else float(lr), options)


STRATEGY_LETTERS = {"R": "random", "W": "weight", "A": "activation", "S": "weight_activation", "G": "gradient"}
DEFAULTS = {"s2ft": None, "pisa": None, "lora": 1e-3, "fourierft": 5e-2, "full": 2e-5}  # None: the trainer's


# The matched budget: 160 down_proj channels x 30 layers, the same count as the S2FT run
# (96 channels + 1 head per layer) and PEFT LoRA r=9 on all seven projections.
BUDGET = 2_764_800


def prepare(model, method: Method, budget: int, seed: int, calibration):
    """The model to train (PEFT wraps it) and its trainable parameter count."""
    from peft import FourierFTConfig, LoraConfig, get_peft_model

    from s2reg.train import PISAConfig, prepare_pisa, prepare_s2ft
    from s2reg.train import S2FTConfig
    from s2reg.train.budget import fit_budget

    cfg = model.config
    layers = cfg.num_hidden_layers
    o = dict(method.options)
    if method.kind == "s2ft":
        roles = tuple(o["roles"].split("+")) if "roles" in o else None
        config = fit_budget(model, budget, S2FTConfig(strategy=o.get("strategy", "random"), seed=seed, roles=roles))
        prepared = prepare_s2ft(model, config, calibration=calibration)
        return model, prepared.num_trainable
    if method.kind == "pisa":
        kwargs = {k: (float(v) if k == "scale" else int(v)) for k, v in o.items() if k in ("scale", "block", "coefficients")}
        if "roles" in o:
            kwargs["roles"] = tuple(o["roles"].split("+"))
        kwargs.setdefault("coefficients", matched_coefficients(model, budget, PISAConfig(**kwargs)))
        prepared = prepare_pisa(model, PISAConfig(seed=seed, **kwargs))
        if o.get("positions") == "low":
            draw_low_frequencies(model)
        return model, prepared.num_trainable
    if method.kind == "lora":
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules() if n.split(".")[-1] in names)
        rank = max(1, round(budget / per_rank))
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=names, lora_dropout=0.0))
    elif method.kind == "fourierft":
        model = get_peft_model(model, FourierFTConfig(n_frequency=budget // (2 * layers), target_modules=["q_proj", "v_proj"],
                                                      random_loc_seed=seed, scaling=float(o.get("scaling", 150.0)),
                                                      init_weights=o.get("init", "random") == "zero"))
    elif method.kind != "full":
        raise SystemExit(f"unknown method {method.name}")
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


def matched_coefficients(model, budget: int, config) -> int:
    """PISA coefficients per block on ``config``'s targets that come closest to ``budget`` without passing it."""
    from s2reg.train.pisa.model import chosen_targets

    blocks = 0
    for _, module in chosen_targets(model, config, None):
        rows, cols = module.weight.shape
        blocks += math.ceil(rows / min(config.block, rows)) * math.ceil(cols / min(config.block, cols))
    return budget // (2 * blocks)


def default_lr(method: Method) -> float:
    if method.lr is not None:
        return method.lr
    from s2reg.train.session import default_lr as trainer_default

    return trainer_default(method.kind)


# ------------------------------------------------------------------------------------------- measures

def greedy(model, tokenizer, prompts: list[str], new_tokens: int) -> list[list[int]]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [row[batch["input_ids"].shape[1]:].tolist() for row in out]


def accuracy(model, tokenizer, held: list[dict]) -> float:
    right = 0
    for start in range(0, len(held), 16):
        chunk = held[start:start + 16]
        width = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in chunk) + 1
        for record, ids in zip(chunk, greedy(model, tokenizer, [r["prompt"] for r in chunk], width)):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            right += text.strip().rstrip(".").split("\n")[0].strip() == record["completion"].strip().rstrip(".")
    return right / len(held)


def prose_nll(model, prose_ids: torch.Tensor) -> float:
    with torch.no_grad():
        chunks = prose_ids.reshape(-1, 128)
        return float(model(input_ids=chunks, labels=chunks).loss)


def agreement(model, references: list[torch.Tensor]) -> float:
    """Share of positions where the model's greedy next token is the base model's (teacher-forced on the base's)."""
    same = total = 0
    with torch.no_grad():
        for ids, prompt_len in references:
            predicted = model(input_ids=ids[None]).logits[0, prompt_len - 1:-1].argmax(-1)
            same += int((predicted == ids[prompt_len:]).sum())
            total += ids.numel() - prompt_len
    return same / total


# ----------------------------------------------------------------------------------------------- runs

def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class Bench:
    def __init__(self, quick: bool, cache: Path):
        """The base model's measures, kept in ``cache`` (JSON) so that later invocations skip them."""
        from transformers import AutoTokenizer

        from fixtures.smollm2 import build_smollm2

        self.path = build_smollm2()
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        ids = self.tokenizer(prose_text())["input_ids"]
        self.prose = torch.tensor(ids[:256 if quick else 512])
        base = json.loads(cache.read_text()) if cache.exists() else {}
        if base.get("prose_tokens") != len(self.prose):
            base = self.measure_base()
            cache.write_text(json.dumps(base))
        self.base_prose, self.base_accuracy = base["prose_nll"], base["accuracy"]
        self.references = [(torch.tensor(ids), n) for ids, n in base["references"]]

    def measure_base(self) -> dict:
        base = load(self.path).eval()
        references = []
        for prompt, ids in zip(UNRELATED, greedy(base, self.tokenizer, UNRELATED, 12)):
            prompt_ids = self.tokenizer(prompt)["input_ids"]
            references.append((prompt_ids + ids, len(prompt_ids)))
        return {"prose_tokens": len(self.prose), "prose_nll": prose_nll(base, self.prose), "references": references,
                "accuracy": {task: accuracy(base, self.tokenizer, make()[1]) for task, make in TASKS.items()}}

    def run(self, method: Method, task: str, seed: int, steps: int, budget: int) -> dict:
        train_records, held = TASKS[task]()
        examples = tokenize(train_records, self.tokenizer, 64)
        random.Random(seed).shuffle(examples)
        model = load(self.path)
        calibration = None
        if method.options.get("strategy") in ("activation", "weight_activation", "gradient"):
            from s2reg.train.data import collate

            calibration = [collate(examples[i:i + BATCH], self.tokenizer.pad_token_id) for i in range(0, 32, BATCH)]
        torch.manual_seed(seed)
        before = {n: p.detach().clone() for n, p in model.named_parameters()} if method.kind in PEFT_KINDS else {}
        model, trainable = prepare(model, method, budget, seed, calibration)
        lr = default_lr(method)
        started = time.perf_counter()
        result = train(model, examples, TrainConfig(max_steps=steps, epochs=100, batch_size=BATCH, lr=lr, seed=seed),
                       pad_id=self.tokenizer.pad_token_id)
        seconds = time.perf_counter() - started
        model.eval()
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        change = relative_change(merged, before) if merged is not model else result.weight_change
        record = {"method": method.name, "kind": method.kind, "task": task, "seed": seed, "steps": steps, "lr": lr,
                  "trainable": trainable, "first_loss": result.losses[0], "final_loss": result.losses[-1],
                  "accuracy": accuracy(merged, self.tokenizer, held), "base_accuracy": self.base_accuracy[task],
                  "prose_nll": prose_nll(merged, self.prose), "base_prose_nll": self.base_prose,
                  "agreement": agreement(merged, self.references), "relative_change": change,
                  "largest_step_change": result.largest_step_change if merged is model else None,
                  "train_seconds": round(seconds, 1)}
        record["prose_rise"] = record["prose_nll"] - self.base_prose
        return record


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


# -------------------------------------------------------------------------------------------- reports

def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def table(records: list[dict]) -> str:
    methods = list(dict.fromkeys((r["method"], r["lr"]) for r in records))  # a default lr may have changed
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lines = ["| method | trainable | lr | " + " | ".join(f"{t} acc % | {t} prose rise | {t} base agree %" for t in tasks) +
             " | seeds |", "|---|---:|---:|" + "---:|---:|---:|" * len(tasks) + "---:|"]
    for m in methods:
        mine = [r for r in records if (r["method"], r["lr"]) == m]
        cells = [m[0], f"{mine[0]['trainable']:,}", f"{mine[0]['lr']:g}"]
        seeds = set()
        for t in tasks:
            rs = [r for r in mine if r["task"] == t]
            seeds |= {r["seed"] for r in rs}
            if not rs:
                cells += ["-", "-", "-"]
                continue
            for key, factor, fmt in (("accuracy", 100, "{:.1f}"), ("prose_rise", 1, "{:+.3f}"), ("agreement", 100, "{:.1f}")):
                values = [r[key] * factor for r in rs]
                cells.append(fmt.format(statistics.mean(values)) + " ± " + fmt.format(spread(values)).lstrip("+"))
        cells.append(str(len(seeds)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 12 steps, S2FT-R, PISA and LoRA only")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+",
                        default=["s2ft-R", "s2ft-W", "s2ft-A", "s2ft-S", "s2ft-G", "pisa", "lora", "fourierft:init=zero,lr=1e-3",
                                 "full"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--budget", type=int, help="trainable parameters to match (default: the S2FT default budget)")
    parser.add_argument("--report", action="store_true", help="only write the table of every run already in OUT.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="default bench/results/quality (quality-quick with --quick)")
    args = parser.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / ("quality-quick" if args.quick else "quality")
    if args.quick:
        args.steps, args.seeds = 12, [0]
        args.methods = [m for m in args.methods if m in ("s2ft-R", "pisa", "lora")] or args.methods
    torch.set_num_threads(args.threads)
    jsonl = args.out.with_suffix(".jsonl")
    if args.report:
        records = [json.loads(line) for line in jsonl.read_text().splitlines()]
        write_table(args.out, [r for r in records if r["steps"] == args.steps])
        return
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.quick, args.out.with_suffix(".base.json"))
    budget = args.budget or BUDGET
    done = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    have = {(r["method"], r["lr"], r["task"], r["seed"], r["steps"]) for r in done}
    print(f"base: prose NLL {bench.base_prose:.3f}, accuracy {bench.base_accuracy}", flush=True)
    for seed in args.seeds:  # every method on seed 0 first: a run cut short still compares them all
        for task in args.tasks:
            for name in args.methods:
                method = Method.parse(name)
                if (name, default_lr(method), task, seed, args.steps) in have:
                    continue
                record = bench.run(method, task, seed, args.steps, budget)
                done.append(record)
                with jsonl.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    write_table(args.out, [r for r in done if r["steps"] == args.steps and r["method"] in args.methods
                           and r["task"] in args.tasks])


def write_table(out: Path, records: list[dict]) -> None:
    first = records[0]
    base_accuracy = {r["task"]: r["base_accuracy"] for r in records}
    markdown = (f"SmolLM2-135M, {first['steps']} steps of batch {BATCH}; base prose NLL {first['base_prose_nll']:.3f}; "
                "base accuracy " + ", ".join(f"{t} {a:.1%}" for t, a in base_accuracy.items()) + "\n\n" + table(records) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
