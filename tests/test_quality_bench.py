"""bench/quality.py's grid logic and report (no training here: the grid itself runs for hours) and the
tasks it trains on (fixtures/quality_tasks.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.quality_tasks import TASKS, facts_task, matches, skill_task

from . import bench_modules

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quality():
    return bench_modules.load("quality")


# ---------------------------------------------------------------------------------------------- tasks

def test_skill_shift_is_longer_numbers_never_trained():
    task = skill_task()
    trained = {r["prompt"] for r in task.train}
    assert len(task.train) == 400 and len(task.held) == 48 and not trained & {r["prompt"] for r in task.held}
    for name, records in task.shifted.items():
        digits = int(name.split("-")[0])
        assert len(records) == 24 and digits in (5, 6)
        for r in records:
            number = r["prompt"].removeprefix("Reverse ").removesuffix(":")
            assert len(number) == digits and r["completion"] == " " + number[::-1]
    assert all(len(r["completion"].strip()) == 4 for r in task.train + task.held)


def test_facts_shift_asks_the_trained_facts_in_unseen_phrasings():
    task = facts_task()
    trained_prompts = {r["prompt"] for r in task.train}
    answers = {r["prompt"].split(" the ")[1].removesuffix(" Club is the"): r["completion"] for r in task.held}
    assert {r["prompt"] for r in task.held} <= trained_prompts  # in-domain: recall in a trained phrasing
    for records in task.shifted.values():
        assert len(records) == 24 and not trained_prompts & {r["prompt"] for r in records}
        for r in records:
            club = next(name for name in answers if f" {name} Club" in r["prompt"])
            assert r["completion"] == answers[club]


def test_tasks_are_the_same_every_time():
    for make in TASKS.values():
        assert make() == make()


@pytest.mark.parametrize("generated, completion, expected", [
    (" 1274\nReverse", " 1274", True), (" otter.", " otter", True), (" 12745", " 1274", False),
    ("otters", " otter", False), ("\n1274", " 1274", True), (" 12\n74", " 1274", False)])
def test_matches_reads_the_first_line(generated, completion, expected):
    assert matches(generated, completion) is expected


# ----------------------------------------------------------------------------------------------- grid

def test_middle_out_puts_the_middle_rate_first(quality):
    assert quality.middle_out([1, 2, 3, 4, 5]) == [3, 4, 2, 5, 1]
    assert quality.middle_out([1, 2, 3, 4]) == [3, 4, 2, 1]


def test_knee_is_most_accuracy_for_least_forgetting(quality):
    front = [{"accuracy": a, "prose_rise": r} for a, r in [(0.0, 0.01), (0.2, 0.02), (0.9, 0.05), (1.0, 0.6), (1.0, 2.0)]]
    assert quality.knee(front) == 2
    flat = [{"accuracy": 0.0, "prose_rise": r} for r in (0.1, 0.2, 0.3)]
    assert quality.knee(flat) == 0  # nothing learned anywhere: the least forgetting


def point_record(quality, point, accuracy, rise):
    where = {"host": "h", "cpu": "c", "cores": 2, "torch": "t", "threads": 1, "utc": "2026-12-07T19:00:00+00:00", "load": 1.5}
    return {"method": point.method, "task": point.task, "lr": point.lr, "seed": point.seed, "steps": point.steps,
            "trainable": 10, "accuracy": accuracy, "shifted_accuracy": accuracy / 2, "prose_rise": rise, "agreement": 0.9,
            "started": where, "finished": where | {"load": 2.5}}


def test_schedule_runs_seed_zero_first_then_seeds_at_the_knee(quality):
    groups, lrs = (("s2ft-R", "lora"), ("pisa",)), [1e-4, 1e-3, 1e-2]
    plan = quality.schedule(groups, ["skill"], 10, 3, {}, lrs)
    assert [(p.method, p.lr) for p in plan] == [("s2ft-R", 1e-3), ("lora", 1e-3), ("s2ft-R", 1e-2), ("lora", 1e-2),
                                                ("s2ft-R", 1e-4), ("lora", 1e-4), ("pisa", 1e-3), ("pisa", 1e-2),
                                                ("pisa", 1e-4)]
    # s2ft-R's front is complete with its knee at 1e-3: its extra seeds there come after its group's
    # seed-0 points and before the next group's
    done = {p: point_record(quality, p, acc, rise)
            for p, acc, rise in zip(plan[0::2][:3], (0.8, 1.0, 0.0), (0.05, 0.5, 0.0), strict=True)}
    later = quality.schedule(groups, ["skill"], 10, 3, done, lrs)
    assert not set(done) & set(later)
    assert [(p.method, p.lr, p.seed) for p in later] == (
        [("lora", lr, 0) for lr in (1e-3, 1e-2, 1e-4)] + [("s2ft-R", 1e-3, 1), ("s2ft-R", 1e-3, 2)]
        + [("pisa", lr, 0) for lr in (1e-3, 1e-2, 1e-4)])


def test_a_claimed_point_is_skipped_by_other_processes_until_released(quality, tmp_path):
    point = quality.Point("s2ft-R", "skill", 1e-3, 0, 100)
    held = quality.claim(tmp_path, point)
    assert held is not None
    script = ("import sys; sys.path.insert(0, 'bench'); import quality; from pathlib import Path; "
              f"print(quality.claim(Path({str(tmp_path)!r}), quality.Point('s2ft-R', 'skill', 1e-3, 0, 100)))")
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert other.stdout.strip() == "None"
    os.close(held)
    again = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert again.stdout.strip().isdigit()


def test_point_files_are_one_per_point(quality):
    a = quality.Point("s2ft-R:heads=1,channels=96,roles=o+down", "skill", 3e-3, 1, 100)
    assert a.filename == "s2ft-R_heads_1_channels_96_roles_o_down__skill__lr0.003__seed1__steps100.json"
    assert quality.Point("lora", "facts", 1e-4, 0, 100).filename != quality.Point("lora", "facts", 1e-4, 0, 20).filename


def test_report_on_a_partial_grid_counts_and_draws(quality, tmp_path):
    out = tmp_path / "quality"
    out.mkdir()
    points = [quality.Point("s2ft-R", "skill", 1e-3, seed, 100) for seed in (0, 1)] + [quality.Point("lora", "skill", 1e-3, 0, 100)]
    for p, acc in zip(points, (0.5, 0.7, 0.4), strict=True):
        (out / p.filename).write_text(json.dumps(point_record(quality, p, acc, 0.1)))
    text = quality.report(out, 100, ["skill", "facts"], tmp_path / "quality-fronts")
    total = len(quality.schedule(quality.GRID, ["skill", "facts"], 100, 3, {}))
    assert f"PARTIAL: 3 points: 2 of the grid's {total} seed-0 points, 1 extra-seed points" in text
    assert "| S2FT-R, 32 down channels (default) | 10 | 0.001 | 60.0 ± 10.0 | 30.0 ± 5.0 | +0.100 ± 0.000 | 90.0 ± 0.0 | 2 |" in text
    saved = json.loads((tmp_path / "quality-fronts.json").read_text())
    assert saved["coverage"]["load"] == [1.5, 2.5] and len(saved["fronts"]) == 2
    assert (tmp_path / "quality-fronts.png").read_bytes()[:4] == b"\x89PNG"
