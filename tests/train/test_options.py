"""One options object from the CLI to the loop (issue 25): ``TrainOptions`` declares every default once, the
CLI's flags are generated from it, and a run's state records it, so that a resume with other options or data
is refused by name and a resume with the same ones continues bit for bit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from s2reg.cli import main
from s2reg.cli.train import OPTION_CLASSES
from s2reg.errors import S2RegError
from s2reg.synth import build_checkpoint
from s2reg.train import PISAConfig, S2FTConfig
from s2reg.train.session import run_training, state_dir_for
from s2reg.train.settings import TrainConfig, TrainOptions, flag_of, option_fields


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def captured(monkeypatch):
    """``s2reg train`` up to the options it hands the session (nothing is loaded)."""
    seen = []

    def stop(base, data, options, **_):
        seen.append(options)
        raise S2RegError("stopped after parsing")

    monkeypatch.setattr("s2reg.train.session.run_training", stop)
    return seen


@pytest.fixture
def files(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n' * 8)
    return base, data, tmp_path / "out"


@pytest.mark.parametrize("method", ["s2ft", "pisa"])
def test_no_flags_give_the_declared_defaults(captured, files, method):
    base, data, out = files
    result = run("train", "--base", base, "--data", data, "--method", method, "-o", out)
    assert result.exit_code == 1 and "stopped after parsing" in result.output
    config = S2FTConfig() if method == "s2ft" else PISAConfig()
    assert captured == [TrainOptions(config)]


def test_every_declared_option_is_a_flag_with_its_help_and_default():
    command = main.commands["train"]
    params = {p.opts[0]: p for p in command.params}
    for cls in OPTION_CLASSES:
        for f in option_fields(cls):
            param = params[flag_of(f)]
            assert param.default is None or param.is_flag, f.name  # the dataclass supplies the default, not click
            if f.metadata["help"]:
                assert f.metadata["help"] in param.help, f.name
            if f.default not in (None, (), False):
                assert "[default: " in param.help, f.name


def test_shared_flags_set_every_config_that_has_the_field(captured, files):
    base, data, out = files
    run("train", "--base", base, "--data", data, "--method", "pisa", "-o", out, "--seed", 7, "--roles", "q,v",
        "--layers", "0,2", "--lr", 3e-3, "--max-grad-norm", 0)
    (options,) = captured
    assert options.loop.seed == 7 and options.method_config.seed == 7
    assert options.method_config.roles == ("q", "v") and options.method_config.layers == (0, 2)
    assert options.loop.lr == 3e-3 and options.loop.max_grad_norm == 0


@pytest.mark.parametrize(("method", "flag", "value", "message"), [
    ("pisa", "--channels", 4, "--channels is an option of --method s2ft, not pisa"),
    ("s2ft", "--block", 16, "--block is an option of --method pisa, not s2ft"),
    ("pisa", "--budget", 100, "--budget sizes S2FT selections"),
    ("s2ft", "--layers", "1,x", "expected comma-separated integers"),
])
def test_options_of_another_method_are_usage_errors(captured, files, method, flag, value, message):
    base, data, out = files
    result = run("train", "--base", base, "--data", data, "--method", method, "-o", out, flag, value)
    assert result.exit_code == 2 and message in result.output and captured == []


def test_the_loop_needs_a_learning_rate_and_the_options_fill_the_methods():
    with pytest.raises(S2RegError, match="no learning rate"):
        TrainConfig().check()
    assert TrainOptions(S2FTConfig()).resolved().loop.lr == S2FTConfig.default_lr
    assert TrainOptions(PISAConfig()).resolved().loop.lr == PISAConfig.default_lr
    assert TrainOptions(PISAConfig(), loop=TrainConfig(lr=0.5)).resolved().loop.lr == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainOptions(S2FTConfig()).max_length = 3


# --- resume ---------------------------------------------------------------------------------------------

@pytest.fixture
def dropout_run(tmp_path):
    """A tiny Llama whose attention drops out while training: a resume that lost the random generators' state
    would draw other dropout masks."""
    base = build_checkpoint(tmp_path / "base", "llama", attention_dropout=0.3)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": ids}) + "\n"
                            for ids in torch.randint(3, 250, (16, 10), generator=g).tolist()))
    return base, data


def _options(**loop):
    return TrainOptions(S2FTConfig(channels=4, heads=1, roles=("o", "down")), device="cpu",
                        loop=TrainConfig(max_steps=6, batch_size=2, lr=1e-3, save_every=2, **loop))


def _crash_at(step):
    def on_step(progress):
        if progress.step == step:
            raise KeyboardInterrupt
    return on_step


def _interrupted(base, data, output, options):
    with pytest.raises(KeyboardInterrupt):
        run_training(base, data, options, output=output, on_step=_crash_at(5))
    assert (state_dir_for(output) / "state.safetensors").is_file() and not output.exists()


def _deltas(adapter):
    return {name: adapter.to_dense(name) for name in adapter.targets}


def test_a_resumed_run_continues_bit_for_bit(dropout_run, tmp_path):
    base, data = dropout_run
    whole = run_training(base, data, _options(), output=tmp_path / "whole")
    _interrupted(base, data, tmp_path / "resumed", _options())
    resumed = run_training(base, data, _options(), output=tmp_path / "resumed", resume=True)
    assert resumed.result.resumed_from == 4 and resumed.result.steps == 6
    assert not state_dir_for(tmp_path / "resumed").exists()  # dropped once the adapter was saved
    a, b = _deltas(whole.adapter), _deltas(resumed.adapter)
    assert a.keys() == b.keys() and all((a[n] == b[n]).all() for n in a)
    assert whole.result.losses[4:] == resumed.result.losses


@pytest.mark.parametrize(("change", "field"), [
    (lambda o: dataclasses.replace(o, loop=dataclasses.replace(o.loop, lr=2e-3)), "options.loop.lr"),
    (lambda o: dataclasses.replace(o, max_length=9), "options.max_length"),
    (lambda o: dataclasses.replace(o, method_config=dataclasses.replace(o.method_config, channels=5)),
     "options.method_config.channels"),
])
def test_a_resume_with_other_options_is_refused_by_name(dropout_run, tmp_path, change, field):
    base, data = dropout_run
    _interrupted(base, data, tmp_path / "out", _options())
    with pytest.raises(S2RegError, match=f"the saved run has {field} "):
        run_training(base, data, change(_options()), output=tmp_path / "out", resume=True)


def test_a_resume_on_other_data_is_refused(dropout_run, tmp_path):
    base, data = dropout_run
    _interrupted(base, data, tmp_path / "out", _options())
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("1", "2"))
    with pytest.raises(S2RegError, match="the saved run has data_sha256 [0-9a-f]{64}, this one "):
        run_training(base, other, _options(), output=tmp_path / "out", resume=True)


def test_resume_does_not_overwrite_an_output(dropout_run, tmp_path):
    base, data = dropout_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    result = run("train", "--base", base, "--data", data, "--method", "s2ft", "-o", out, "--max-steps", 2,
                 "--resume")
    assert result.exit_code == 1 and "already exists" in result.output
    assert (out / "keep").read_text() == "mine"


def test_an_output_that_appears_during_the_run_is_not_replaced_and_the_run_is_kept(dropout_run, tmp_path):
    base, data = dropout_run
    out = tmp_path / "out"

    def someone_else_writes(progress):
        if progress.step == 6:
            out.mkdir()
            (out / "keep").write_text("theirs")

    with pytest.raises(S2RegError, match="appeared during the run and was not replaced"):
        run_training(base, data, _options(), output=out, on_step=someone_else_writes)
    assert (out / "keep").read_text() == "theirs"
    finished = run_training(base, data, _options(), output=out, resume=True, overwrite=True)
    assert finished.result.resumed_from == 6 and not (out / "keep").exists()  # no step trained again


def test_train_prints_one_progress_display(tmp_path):
    """transformers' own "Loading weights" bar stays off: the output is s2reg's."""
    import subprocess
    import sys

    base = build_checkpoint(tmp_path / "base", "llama")
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [5, 6, 7, 8]}\n' * 8)
    done = subprocess.run([sys.executable, "-m", "s2reg", "train", "--base", str(base), "--data", str(data),
                           "--method", "s2ft", "--channels", "2", "-o", str(tmp_path / "a"), "--max-steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Loading" not in done.stderr and "it/s" not in done.stderr, done.stderr
