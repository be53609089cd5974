"""`pretrain-plot` and `pretrain-eval` on the shared training run (see test_tracking.trained_run)."""

import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from test_tracking import trained_run


pytestmark = pytest.mark.slow  # the shared `pretrain` run and the console scripts' processes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory)


def write_metrics(run_dir, lines: list[str]) -> None:
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))


# --- pretrain-plot ---------------------------------------------------------------------------

def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_overlays_runs_in_three_panels(run, tmp_path):
    import matplotlib.colors
    import matplotlib.image

    from pretrain.tools.plot import plot_runs

    other = tmp_path / "other"
    record = lambda step, loss: json.dumps({"step": step, "loss": loss, "tokens_per_s": 100.0 * step})  # noqa: E731
    write_metrics(other, [
        json.dumps({"step": 0, "valid/loss": 7.0, "valid/ppl": math.exp(7.0)}),
        *[record(s, 7.0 - s / 10) for s in range(1, 6)],
        record(3, 1.0),  # resumed from step 2: the later value of step 3 wins
        '{"step": 6, "loss": 6.',  # cut short by a kill
    ])
    output = tmp_path / "plots" / "compare.png"
    figure = plot_runs([run.run_dir, other], output)
    assert png_size(output) == (1800, 450)

    train = [r for r in run.records() if "loss" in r]
    valid = [r for r in run.records() if "valid/loss" in r]
    expected = {  # panel → {label: (steps, values)}
        0: {"run": ([r["step"] for r in train], [r["loss"] for r in train]),
            "other": ([1, 2, 3, 4, 5], [6.9, 6.8, 1.0, 6.6, 6.5])},
        1: {"run": ([r["step"] for r in valid], [r["valid/loss"] for r in valid]), "other": ([0], [7.0])},
        2: {"run": ([r["step"] for r in train], [r["tokens_per_s"] for r in train]),
            "other": ([1, 2, 3, 4, 5], [100.0, 200.0, 100.0 * 3, 400.0, 500.0])},
    }
    titles = [axis.get_title() for axis in figure.axes]
    assert titles == ["training loss", "validation loss", "tokens/s"]
    for panel, curves in expected.items():
        lines = {line.get_label(): line for line in figure.axes[panel].get_lines()}
        assert lines.keys() == curves.keys()
        for label, (steps, values) in curves.items():
            assert list(lines[label].get_xdata()) == steps
            np.testing.assert_allclose(lines[label].get_ydata(), values)
        assert [t.get_text() for t in figure.axes[panel].get_legend().get_texts()] == ["run", "other"]

    # Both runs' colours are drawn in the image, and they differ.
    colours = [line.get_color() for line in figure.axes[0].get_lines()]
    assert colours[0] != colours[1]
    pixels = matplotlib.image.imread(output)[..., :3]
    for colour in colours:
        close = np.abs(pixels - np.array(matplotlib.colors.to_rgb(colour))).max(axis=-1) < 0.02
        assert close.sum() > 100, colour


def test_plot_refuses_missing_runs_in_one_line(tmp_path, capsys):
    result = subprocess.run([sys.executable, "-m", "pretrain.tools.plot", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"pretrain-plot: error: {tmp_path / 'missing'}: no such run directory\n"

    from pretrain.tools.plot import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "-o", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        f"pretrain-plot: error: {tmp_path / 'metrics.jsonl'}: not found (is {tmp_path} a run directory?)\n")
    write_metrics(tmp_path / "bad", ["{}", "{}"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad")])
    assert "metrics.jsonl:1: expected a JSON object with an integer 'step'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# --- pretrain-eval ---------------------------------------------------------------------------

def valid_loss_at(run, step: int) -> float:
    (loss,) = [r["valid/loss"] for r in run.records() if r["step"] == step and "valid/loss" in r]
    return loss


def test_eval_reproduces_the_trainers_validation_loss(run):
    """The console script on the final checkpoint and the trainer's own validation batches."""
    # Not the process-group variables of this test process, if it has started one.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run(
        [sys.executable, "-m", "pretrain.tools.evaluate", str(run.run_dir / "checkpoints" / "step_0000012"),
         "--valid", "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["step"] == 12 and scores["tokens"] == 2 * 8 * 64 and scores["sequences"] == 16
    assert abs(scores["loss"] - valid_loss_at(run, 12)) < 1e-4
    assert math.isclose(scores["ppl"], math.exp(scores["loss"]), rel_tol=1e-12)


def test_eval_in_process_on_an_earlier_checkpoint_and_a_text_file(run, tmp_path, capsys):
    from data_pipeline.tokenizer import Tokenizer
    from pretrain.tools.evaluate import main

    # The run's config supplies seq_len; batches of 8 as the trainer used.
    scores = main([str(run.run_dir / "checkpoints" / "step_0000006"), "--valid", "--json"])
    assert scores["seq_len"] == 64 and abs(scores["loss"] - valid_loss_at(run, 6)) < 1e-4
    scores = main([str(run.run_dir), "--data", str(run.valid_prefix), "--batches", "2", "--json"])
    assert scores["tokens"] == 2 * 8 * 64 and math.isclose(scores["ppl"], math.exp(scores["loss"]))

    text = tmp_path / "notes.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 20 + "print(add(1, 2))\n")
    scores = main([str(run.run_dir), "--text", str(text), "--seq-len", "32", "--json"])
    ids = Tokenizer(run.run_dir / "tokenizer.model").encode([text.read_text()])[0]
    targets = len(ids) + 1  # EOS before and after the document; every token after the first is a target
    assert scores["step"] == 12 and scores["tokens"] == targets
    assert scores["sequences"] == math.ceil(targets / 32)
    assert math.isclose(scores["ppl"], math.exp(scores["loss"]), rel_tol=1e-12)
    assert 0 < scores["loss"] < valid_loss_at(run, 0) + 1
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed[-1] == scores


@pytest.mark.parametrize("args,message", [
    (["{run}", "--data", "{tmp}/nowhere/valid"], "{tmp}/nowhere/valid.idx: shard file not found"),
    (["{tmp}/nothing", "--data", "{valid}"], "{tmp}/nothing: no such run or checkpoint directory"),
    (["{run}", "--text", "{tmp}/absent.txt"], "{tmp}/absent.txt: No such file or directory"),
    (["{run}", "--data", "{valid}", "--seq-len", "5000"], "--seq-len=5000: expected 1..1024 (model.max_seq_len)"),
])
def test_eval_refuses_bad_input_in_one_line(run, tmp_path, capsys, args, message):
    from pretrain.tools.evaluate import main

    fill = dict(run=run.run_dir, tmp=tmp_path, valid=run.valid_prefix)
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**fill) for a in args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1:] == [f"pretrain-eval: error: {message.format(**fill)}"]
