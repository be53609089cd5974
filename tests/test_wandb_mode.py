"""Which W&B mode a run starts in, and an online start that fails going on offline.

No test here reaches the network: the mode is a pure function of `logger.mode` and the
environment, the fallback is checked with a `wandb.init` that fails at once, and the one
real W&B start points at a closed port on this machine with a short timeout.
"""

import os
import socket
import subprocess
import sys
import types

import pytest

from common.typed_config import ConfigError
from pretrain.training.sinks import ONLINE_INIT_TIMEOUT_S, WandbSink, init_wandb, wandb_mode

KEY = "x" * 40


@pytest.mark.parametrize(
    "configured,environ,expected",
    [
        # auto: W&B's own variables decide, WANDB_MODE first.
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": KEY}, "online"),
        ("auto", {"WANDB_API_KEY": KEY, "WANDB_MODE": "offline"}, "offline"),
        ("auto", {"WANDB_API_KEY": KEY, "WANDB_MODE": "disabled"}, "disabled"),
        ("auto", {"WANDB_API_KEY": KEY, "WANDB_MODE": "dryrun"}, "offline"),
        ("auto", {"WANDB_MODE": "online"}, "online"),
        ("auto", {"WANDB_MODE": "Offline "}, "offline"),
        ("auto", {"WANDB_MODE": "", "WANDB_API_KEY": KEY}, "online"),  # set but empty: as if unset
        # An explicit logger.mode wins over the environment.
        ("offline", {"WANDB_API_KEY": KEY, "WANDB_MODE": "online"}, "offline"),
        ("online", {"WANDB_MODE": "offline"}, "online"),
        ("disabled", {"WANDB_API_KEY": KEY}, "disabled"),
    ],
)
def test_wandb_mode(configured, environ, expected):
    assert wandb_mode(configured, environ) == expected


def test_wandb_mode_refuses_a_mode_wandb_does_not_know():
    with pytest.raises(ConfigError) as err:
        wandb_mode("auto", {"WANDB_MODE": "offlne"})
    assert str(err.value).startswith("WANDB_MODE=offlne: expected one of online, ")
    assert wandb_mode("offline", {"WANDB_MODE": "offlne"}) == "offline"  # not consulted


class FakeWandb:
    """wandb's `init`, `teardown` and `Settings`, recording each call; an online start fails at once."""

    def __init__(self, fail_online: bool = True):
        self.fail_online = fail_online
        self.starts: list[dict] = []
        self.calls: list[str] = []

    @staticmethod
    def Settings(**values):  # noqa: N802 - wandb's name
        return types.SimpleNamespace(**values)

    def teardown(self):
        self.calls.append("teardown")

    def init(self, **kwargs):
        self.starts.append(kwargs)
        self.calls.append(kwargs["mode"])
        if kwargs["mode"] == "online" and self.fail_online:
            raise RuntimeError("Run initialization has timed out after 30.0 sec.\nPlease try again.")
        return types.SimpleNamespace(mode=kwargs["mode"], finish=lambda: None)


def test_failed_online_start_goes_on_offline_in_one_line(capsys, tmp_path):
    fake = FakeWandb()
    run = init_wandb(fake, "online", {}, project="p", id="abc", dir=str(tmp_path))
    assert run.mode == "offline"
    # W&B's service still holds the run id after the failed start: a fresh one for the offline run.
    assert fake.calls == ["online", "teardown", "offline"]
    assert fake.starts[0]["settings"].init_timeout == ONLINE_INIT_TIMEOUT_S <= 60  # bounded, modest
    assert "settings" not in fake.starts[1] and fake.starts[1]["id"] == "abc"  # the same run, offline
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "offline" in lines[0] and "timed out after 30.0 sec." in lines[0], lines


def test_online_start_that_works_and_other_modes_are_left_alone(capsys):
    fake = FakeWandb(fail_online=False)
    assert init_wandb(fake, "online", {}, project="p").mode == "online"
    assert init_wandb(fake, "online", {"WANDB_INIT_TIMEOUT": "5"}, project="p").mode == "online"
    assert init_wandb(fake, "offline", {}, project="p").mode == "offline"
    assert init_wandb(fake, "disabled", {}, project="p").mode == "disabled"
    assert "settings" in fake.starts[0]
    assert all("settings" not in s for s in fake.starts[1:])  # W&B's own WANDB_INIT_TIMEOUT wins
    assert "teardown" not in fake.calls
    assert capsys.readouterr().err == ""


def test_sink_follows_wandb_mode_and_falls_back(monkeypatch, tmp_path, capsys):
    import wandb

    fake = FakeWandb()
    monkeypatch.setattr(wandb, "init", fake.init)
    monkeypatch.setattr(wandb, "teardown", fake.teardown)
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    sink = WandbSink(str(tmp_path / "a"), "p", None, "auto", {})
    assert fake.starts == [] and not (tmp_path / "a").exists()  # started at the first record
    sink.open()
    assert sink.run.mode == "offline"  # WANDB_MODE wins
    assert [s["mode"] for s in fake.starts] == ["offline"]

    monkeypatch.delenv("WANDB_MODE")
    fake.starts.clear()
    sink = WandbSink(str(tmp_path / "b"), "p", None, "auto", {})  # a key, no WANDB_MODE: online, which fails
    sink.open()
    assert sink.run.mode == "offline" and [s["mode"] for s in fake.starts] == ["online", "offline"]
    assert fake.starts[0]["id"] == fake.starts[1]["id"]  # the same W&B run, to be synced later
    assert (tmp_path / "b" / "wandb_run_id").read_text() == fake.starts[1]["id"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SCRIPT = """
import sys
from pretrain.training.sinks import WandbSink
sink = WandbSink(sys.argv[1], "pretrain", None, "auto", {"seed": 1})
sink.log({"step": 1, "loss": 2.5})
sink.on_train_end(None)
print("mode", sink.run.settings.mode)
"""


@pytest.mark.slow  # W&B starts its wandb-core service process
def test_real_wandb_without_a_server_goes_on_offline(tmp_path):
    """A real online start against a closed local port: it fails within the timeout, the run
    goes on offline. In its own process, so that W&B reads this environment when it sets up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY=KEY, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}", WANDB_INIT_TIMEOUT="3",
               WANDB_CONFIG_DIR=str(tmp_path / "config"), WANDB_CACHE_DIR=str(tmp_path / "cache"),
               WANDB_DATA_DIR=str(tmp_path / "data"), HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mode offline" in result.stdout, result.stdout[-2000:]
    notes = [line for line in result.stderr.splitlines() if line.startswith("pretrain: note: W&B could not")]
    assert len(notes) == 1 and "logging offline" in notes[0], result.stderr[-3000:]
    run_id = (run_dir / "wandb_run_id").read_text()
    assert list(run_dir.glob(f"wandb/offline-run-*/run-{run_id}.wandb")), sorted(run_dir.rglob("*"))
