"""The fine-tuning task data: deterministic, committed as generated, answers correct."""

from __future__ import annotations

import json

from fixtures import tasks


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generator_is_deterministic(tmp_path):
    first = tasks.write_tasks(tmp_path / "a")
    second = tasks.write_tasks(tmp_path / "b")
    assert set(first) == {"train", "eval"}
    for split in first:
        assert first[split].read_bytes() == second[split].read_bytes()


def test_committed_data_is_what_the_generator_writes(tmp_path):
    for split, path in tasks.write_tasks(tmp_path).items():
        assert tasks.path_of(split).read_bytes() == path.read_bytes()


def test_splits_have_the_promised_sizes_and_fields():
    train, evaluation = _lines(tasks.path_of("train")), _lines(tasks.path_of("eval"))
    assert (len(train), len(evaluation)) == (400, 64)
    assert all(set(e) == {"prompt", "completion"} for e in train + evaluation)
    assert len({e["prompt"] for e in train}) > 0.9 * len(train)  # varied, not a few examples repeated
    held_out = {e["prompt"] for e in evaluation} - {e["prompt"] for e in train}
    assert len(held_out) > 0.9 * len(evaluation)  # the eval split mostly tests unseen inputs


def test_every_answer_is_the_prompt_words_reversed():
    for split in tasks.SPLITS:
        for e in _lines(tasks.path_of(split)):
            assert e["prompt"].startswith("Reverse: ") and e["prompt"].endswith("\nAnswer:")
            words = e["prompt"][len("Reverse: "):-len("\nAnswer:")].split(" ")
            assert 3 <= len(words) <= 5 and len(set(words)) == len(words)
            assert e["completion"] == " " + " ".join(words[::-1])
