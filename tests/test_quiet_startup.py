"""What a `pretrain` run shows on the console (common/console.py), and what goes to its log.

The routing rules are checked here in-process on stand-in streams; the whole
thing (file descriptors, child processes, the log opened under the run
directory's lock) on two real runs: the default quiet one and
`trainer.verbose=true`. A probe module, a stand-in for a third-party library,
speaks through every channel right after the console is set up.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common import console
from conftest import TINY, child_env

# What DeepSpeed, megatron-core and the op builds print before the first line of a run.
CHATTER = (
    "Setting accelerator to",
    "Megatron-FSDP",
    "Transformer Engine and Apex are not installed",
    "gcc ",
    "built successfully",
    "Load the _IndexReader",
    "total number of documents",
)

PROBE = '''
"""A third-party library that prints, logs, warns and runs a child process."""
import logging, subprocess, sys, warnings

from parallel import cluster_env

_detect = cluster_env.detect


def speak():
    print("probe: a library print")
    sys.stderr.write("probe: a library write to stderr\\n")
    subprocess.run(["sh", "-c", "echo probe: a child on stdout; echo probe: a child on stderr >&2"], check=True)
    log = logging.getLogger("probe_library")
    log.info("probe: an info record")
    log.warning("probe: a warning record")
    warnings.warn("probe: a real warning", RuntimeWarning)
    warnings.warn("Transformer Engine and Apex are not installed. probe: a harmless one", UserWarning)


def detect():  # `pretrain` calls it right after setting up the console
    speak()
    return _detect()


cluster_env.detect = detect
'''
HIDDEN = ("probe: a library print", "probe: a library write to stderr", "probe: a child on stdout",
          "probe: a child on stderr", "probe: an info record", "probe: a harmless one")
SHOWN_ON_STDERR = ("WARNING probe_library: probe: a warning record", "RuntimeWarning: probe: a real warning")


# --- the rules, in this process -------------------------------------------------------------------

def write_from(module: str, stream, text: str) -> None:
    """`print(text, file=stream)` made by code of `module`."""
    exec("print(text, file=stream, end='')", {"__name__": module, "stream": stream, "text": text})


def test_router_shows_the_projects_lines_and_hides_the_rest():
    shown, log = io.StringIO(), io.StringIO()
    router = console.Router(shown, log)
    write_from("pretrain.training.trainer", router, "step 1\n")
    write_from("data_pipeline.prepare", router, "data: reusing\n")
    write_from("deepspeed.comm.torch", router, "DeepSpeed op built successfully\n")
    write_from("megatron.core.datasets", router, "Load the _IndexReader\n")
    write_from("traceback", router, "Traceback (most recent call last):\n")
    write_from("pretrain.training.callbacks", router, "\r\x1b[Kstep 2/9 ███\n")  # a redrawn line
    assert shown.getvalue() == "step 1\ndata: reusing\nTraceback (most recent call last):\n\r\x1b[Kstep 2/9 ███\n"
    assert log.getvalue() == ("step 1\ndata: reusing\nDeepSpeed op built successfully\nLoad the _IndexReader\n"
                              "Traceback (most recent call last):\n")


def test_a_stream_wrapper_passes_on_its_callers_verdict():
    """W&B's console capture replaces `sys.stdout.write`; the progress line wraps sys.stdout."""
    shown, log = io.StringIO(), io.StringIO()
    router = console.Router(shown, log)
    wrapper = {"__name__": "wandb.sdk.lib.console_capture", "router": router}
    exec("def write_with_callbacks(text):\n    return router.write(text)", wrapper)
    exec("w('ours\\n')", {"__name__": "pretrain.training.run", "w": wrapper["write_with_callbacks"]})
    exec("w('theirs\\n')", {"__name__": "torch.utils", "w": wrapper["write_with_callbacks"]})
    assert shown.getvalue() == "ours\n" and log.getvalue() == "ours\ntheirs\n"
    # W&B's own lines (logger=wandb), which it writes through click.echo.
    helper = {"__name__": "click.utils", "router": router}
    exec("def echo(text, file=None):\n    file.write(text)", helper)
    exec("echo('wandb: Run data is saved locally in runs/x/wandb\\n', file=router)",
         {"__name__": "wandb.errors.term", "echo": helper["echo"], "router": router})
    assert shown.getvalue().endswith("wandb: Run data is saved locally in runs/x/wandb\n")


def test_log_records_by_level_and_known_harmless_ones():
    shown, log = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(console.Router(shown, log))
    for name, level, message in (("megatron.core", logging.INFO, "info from a library"),
                                 ("megatron.core", logging.WARNING, "a real warning"),
                                 ("DeepSpeed", logging.WARNING, "Setting accelerator to CPU. If you have GPU"),
                                 ("DeepSpeed", logging.ERROR, "a real error")):
        handler.handle(logging.LogRecord(name, level, __file__, 1, message, None, None))
    assert shown.getvalue().splitlines() == ["a real warning", "a real error"]
    assert len(log.getvalue().splitlines()) == 4

    shown, log = io.StringIO(), io.StringIO()  # the root logger's own handler, the same verdicts
    handler = console.RecordHandler(shown, log)
    for level, message in ((logging.INFO, "gcc -c test.c"), (logging.WARNING, "a real warning")):
        handler.handle(logging.LogRecord("root", level, __file__, 1, message, None, None))
    assert shown.getvalue() == "a real warning\n" and log.getvalue() == "gcc -c test.c\na real warning\n"


def test_python_warnings_known_harmless_or_not():
    site = "/usr/lib/python3/site-packages/megatron/core/optimizer/__init__.py"
    assert not console.warning_shown(UserWarning("Transformer Engine and Apex are not installed."), site)
    assert console.warning_shown(UserWarning("something the user must know"), site)
    own = str(Path(console.__file__).resolve().parent.parent / "pretrain" / "model" / "layers.py")
    assert console.warning_shown(UserWarning("Transformer Engine and Apex are not installed."), own)


def test_captured_streams_are_left_alone(capsys):
    before = sys.stdout, sys.stderr
    console.quiet()  # pytest has replaced the streams: no descriptors taken, nothing redirected
    assert (sys.stdout, sys.stderr) == before and not console.is_quiet()


# --- two real runs -----------------------------------------------------------------------------------

def run_with_probe(tmp_path: Path, cache: Path, name: str, *overrides: str) -> tuple[subprocess.CompletedProcess,
                                                                                     Path]:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "probe_library.py").write_text(textwrap.dedent(PROBE))
    run_dir = tmp_path / name
    env = child_env({"PYTHONPATH": f"{probe_dir}:{Path(console.__file__).resolve().parent.parent}"})
    result = subprocess.run(
        [sys.executable, "-c", "import probe_library; from pretrain.main import cli; cli()",
         *TINY, f"data.cache_dir={cache}", f"trainer.run_dir={run_dir}", "trainer.train_steps=2",
         "trainer.eval_interval=0", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, run_dir / "logs" / "rank0.log"


@pytest.mark.slow  # two `pretrain` processes
def test_console_shows_the_runs_lines_and_the_log_has_everything(tmp_path, tiny_data_cache):
    quiet, log_path = run_with_probe(tmp_path, tiny_data_cache, "quiet")
    console_text = quiet.stdout + quiet.stderr
    log = log_path.read_text()
    # The project's lines on the console, and in the log too.
    assert "── summary" in quiet.stdout and "── summary" in log
    # Third-party output only in the log: the library's own, and the probe's on every channel.
    assert [c for c in CHATTER if c in console_text] == []
    assert [h for h in HIDDEN if h in console_text] == [], console_text
    assert [h for h in HIDDEN + SHOWN_ON_STDERR if h not in log] == []
    # Real warnings still reach stderr, and nothing else does.
    assert [s for s in SHOWN_ON_STDERR if s not in quiet.stderr] == [], quiet.stderr
    assert [line for line in quiet.stderr.splitlines()
            if not any(s in line for s in SHOWN_ON_STDERR) and "warnings.warn" not in line] == [], quiet.stderr

    verbose, _ = run_with_probe(tmp_path, tiny_data_cache, "verbose", "trainer.verbose=true")
    console_text = verbose.stdout + verbose.stderr
    assert "── summary" in verbose.stdout
    assert [h for h in HIDDEN + ("probe: a warning record", "probe: a real warning")
            if h not in console_text] == [], console_text
    chatter = [c for c in CHATTER if c in console_text]
    assert chatter, console_text  # what the quiet run kept off the console...
    assert [c for c in chatter if c not in log] == []  # ...is in its log
