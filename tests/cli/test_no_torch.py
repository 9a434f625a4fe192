"""``import s2reg``, ``s2reg --help`` and the commands that read, check and merge adapters never import torch
(issue 12: start-up is most of what they cost). Each command runs in a fresh interpreter, which then reports
whether torch, transformers or safetensors' torch module were ever imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from s2reg.cli import main

from ..surgery.helpers import s2ft, tensor_digests, tiny

HEAVY = ("torch", "transformers", "safetensors.torch")

_RUN = """
import json, sys
from s2reg.cli import main
try:
    main(sys.argv[1:], prog_name="s2reg")
    status = 0
except SystemExit as exc:
    status = exc.code or 0
print(json.dumps({"status": status, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def fresh(*args, env=None) -> dict:
    """Run ``s2reg ARGS`` in a new interpreter; its exit status and the heavy modules it imported."""
    done = subprocess.run([sys.executable, "-c", _RUN, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("no-torch")
    base = tiny(root / "base")
    s2ft(base, seed=1).save(root / "a")
    s2ft(base, seed=2, heads=(0,), channels=(9,)).save(root / "b")
    home = {"S2REG_HOME": str(root / "home")}
    runner = CliRunner(env=home)
    for i in range(3):
        assert runner.invoke(main, ["push", str(root / "a"), f"math:v{i}"]).exit_code == 0
    return root, base, home


def test_import_s2reg_loads_no_torch():
    code = f"import sys, s2reg; s2reg.load; s2reg.Store; s2reg.merge; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("args, status", [
    (["--help"], 0),
    (["ls"], 0),
    (["ls", "--json"], 0),
    (["show", "math:v1"], 0),
    (["tag", "math:v1", "math:latest"], 0),
    (["verify"], 0),
    (["inspect", "{a}"], 0),
    (["inspect", "math:v0", "--json"], 0),
    (["validate", "{a}"], 0),
    (["validate", "{a}", "--base", "{base}"], 0),
    (["diff", "{a}", "math:v2"], 0),  # diff(1)'s statuses: 0 identical, 1 different
    (["diff", "{a}", "{b}", "--json"], 1),
    (["diff", "{base}", "{base}"], 0),
])
def test_reading_and_checking_commands_load_no_torch(setup, args, status):
    root, base, home = setup
    filled = [a.format(a=root / "a", b=root / "b", base=base) for a in args]
    report = fresh(*filled, env=home)
    assert report == {"status": status, "heavy": []}, (filled, report)


def test_merge_unmerge_recover_load_no_torch(setup, tmp_path):
    root, base, home = setup
    original = tensor_digests(base)
    steps = [
        ["merge", base, root / "a", root / "b", "-o", tmp_path / "merged"],
        ["unmerge", tmp_path / "merged", root / "a", root / "b", "-o", tmp_path / "restored"],
    ]
    shutil.copytree(base, tmp_path / "live")
    steps += [
        ["merge", tmp_path / "live", root / "a", "--in-place"],
        ["unmerge", tmp_path / "live", root / "a", "--in-place"],
        ["recover", tmp_path / "live"],
    ]
    for args in steps:
        assert fresh(*args, env=home) == {"status": 0, "heavy": []}, args
    assert fresh("diff", base, tmp_path / "merged", env=home) == {"status": 1, "heavy": []}
    assert tensor_digests(tmp_path / "merged") != original
    assert tensor_digests(tmp_path / "restored") == original
    assert tensor_digests(tmp_path / "live") == original


def test_a_refused_command_is_still_torch_free(setup, tmp_path):
    root, base, home = setup
    report = fresh("merge", base, root / "a", "-o", tmp_path / "m", "--in-place", env=home)
    assert report == {"status": 2, "heavy": []}


def _light(args, home) -> dict:
    code = _RUN.replace("%r" % (HEAVY,), "('numpy', 'ml_dtypes', 'zstandard')")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, **home}, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["ls", "--json"]])
def test_listing_loads_not_even_numpy(setup, args):
    """These only read refs and manifests (JSON): numpy's import alone is a third of their run time."""
    assert _light(args, setup[2]) == {"status": 0, "heavy": []}


def test_tagging_and_removing_a_tag_load_not_even_numpy(setup):
    """One test, so that the tag exists when rm runs (parallel workers each build their own store)."""
    assert _light(["tag", "math:v0", "math:stable"], setup[2]) == {"status": 0, "heavy": []}
    assert _light(["rm", "math:stable"], setup[2]) == {"status": 0, "heavy": []}


def test_permute_and_surgery_on_a_permuted_checkpoint_load_no_torch(setup, tmp_path):
    """permute, merge/unmerge into the co-permuted checkpoint (adapters map onto it, spec/SURGERY.md §4),
    validate against it, and unpermute: numpy only, and unpermute gives back every original bit."""
    root, base, home = setup
    permuted, merged, restored = tmp_path / "permuted", tmp_path / "merged", tmp_path / "restored"
    steps = [
        ["permute", base, "--plan", root / "a", "-o", permuted],
        ["validate", root / "a", "--base", permuted],
        ["merge", permuted, root / "a", "-o", merged],
        ["unmerge", merged, root / "a", "-o", tmp_path / "unmerged"],
        ["unpermute", tmp_path / "unmerged", "-o", restored],
    ]
    for args in steps:
        assert fresh(*args, env=home) == {"status": 0, "heavy": []}, args
    assert tensor_digests(permuted) != tensor_digests(base)  # the plan really moved heads and channels
    assert tensor_digests(tmp_path / "unmerged") == tensor_digests(permuted)
    assert tensor_digests(restored) == tensor_digests(base)


def test_push_pull_and_the_hub_remote_load_no_torch(setup, tmp_path):
    """The registry's writes (push, pull -o) in a fresh interpreter, and the Hub remote's module."""
    root, _, home = setup
    assert fresh("push", root / "b", "other:v1", env=home) == {"status": 0, "heavy": []}
    assert fresh("pull", "other:v1", "-o", tmp_path / "out", env=home) == {"status": 0, "heavy": []}
    assert adapter_files(tmp_path / "out") == adapter_files(root / "b")
    code = f"import sys, s2reg.registry.hub; print([m for m in {HEAVY!r} if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def adapter_files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize(("args", "status"), [
    (["train", "--help"], 0),
    (["fuse", "--help"], 0),
    (["train", "--base", "{base}", "--data", "{data}", "--method", "lora", "-o", "{out}"], 2),  # issue 24: took 17-20 s
    (["train", "--base", "{base}", "--data", "{data}", "--method", "s2ft", "-o", "{out}", "--budget", 9, "--heads", 1], 2),
    (["train", "--base", "{base}", "--data", "{data}", "--method", "s2ft", "-o", "{out}", "--cpu-offload"], 2),
    (["train", "--base", "{base}", "--data", "{bad}", "--method", "s2ft", "-o", "{out}"], 1),  # a malformed line
    (["fuse", "{a}", "{a}", "--method", "slerp", "-o", "{out}"], 2),
])
def test_train_and_fuse_refuse_bad_options_and_data_before_importing_torch(setup, tmp_path, args, status):
    root, base, home = setup
    (tmp_path / "d.jsonl").write_text('{"input_ids": [1, 2]}\n' * 4)
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 2],\n')
    places = {"base": base, "data": tmp_path / "d.jsonl", "bad": tmp_path / "bad.jsonl", "out": tmp_path / "out",
              "a": root / "a"}
    report = fresh(*[str(a).format(**places) for a in args], env=home)
    assert report == {"status": status, "heavy": []}, args


def test_a_malformed_data_line_is_one_whole_reason_and_no_progress_line(setup, tmp_path):
    root, base, home = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 2],\n')
    result = CliRunner(env=home).invoke(main, ["train", "--base", str(base), "--data", str(bad), "--method", "s2ft",
                                               "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output == f"Error: {bad}:2: not valid JSON (Expecting property name enclosed in double quotes " \
                            "at column 23)\n"


def test_fuse_lists_the_methods_of_the_library():
    from s2reg.cli.fuse import METHODS as listed
    from s2reg.ops.fuse import METHODS

    assert sorted(listed) == sorted(METHODS)
