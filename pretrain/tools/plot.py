"""`pretrain-plot`: training curves of one or more runs in one PNG.

    pretrain-plot runs/default                      # writes metrics.png
    pretrain-plot runs/a runs/b -o compare.png      # runs overlaid, one colour each

Three panels from each run's metrics.jsonl: training loss, validation loss
and throughput (tokens/s), against the optimizer step.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError, fail
from common.paths import file_above

PANELS = (("loss", "training loss"), ("valid/loss", "validation loss"), ("tokens_per_s", "tokens/s"))


class MetricsError(UserError, ValueError):
    """A run directory or its metrics file is missing or malformed; the message names it."""


@dataclass
class RunCurves:
    label: str
    # metric name → (steps, values), sorted by step
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def read_metrics(run_dir: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Each metric's (steps, values) from a run's metrics.jsonl.

    A resumed run may have logged a step twice (once before an interruption,
    once after resuming from an earlier checkpoint): the later record wins.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MetricsError(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise MetricsError(f"{path}: not found (is {run_dir} a run directory?)")
    by_step: dict[str, dict[int, float]] = {}
    lines = path.read_bytes().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            if number == len(lines):  # a line cut short by a killed run
                break
            raise MetricsError(f"{path}:{number}: not a JSON record") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        for key, _ in PANELS:
            if isinstance(record.get(key), (int, float)):
                by_step.setdefault(key, {})[record["step"]] = float(record[key])
    return {key: (sorted(values), [values[s] for s in sorted(values)]) for key, values in by_step.items()}


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, or whole paths where two runs share a name."""
    names = [p.resolve().name for p in run_dirs]
    return [n if names.count(n) == 1 else str(p) for n, p in zip(names, run_dirs)]


def build_figure(runs: list[RunCurves]):
    """The figure: one panel per metric, one line per run (same colour across panels)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.5), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (key, title) in zip(axes, PANELS):
        for index, run in enumerate(runs):
            if key in run.series:
                steps, values = run.series[key]
                # Validation points are sparse: mark them so a single one is visible.
                axis.plot(steps, values, label=run.label, color=colours[index % len(colours)],
                          marker="o" if key == "valid/loss" else None, markersize=3, linewidth=1.2)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    return figure


def check_output(output: Path) -> None:
    """Refuses an output path that cannot become an image file, before any run is read."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = output.suffix.lstrip(".").lower()
    if suffix and suffix not in formats:
        raise MetricsError(f"-o {output}: unknown image format .{suffix}; expected one of "
                           f"{', '.join('.' + f for f in sorted(formats))}")
    if output.is_dir():
        raise MetricsError(f"-o {output}: a directory, expected the path of an image file")
    blocking = file_above(output)
    if blocking is not None:
        raise MetricsError(f"-o {output}: lies below the file {blocking}; expected a directory there")


def plot_runs(run_dirs: list[str | Path], output: str | Path):
    """Reads the runs and writes the PNG; returns the figure (its lines hold the plotted data)."""
    output = Path(output)
    check_output(output)
    run_dirs = [Path(p) for p in run_dirs]
    runs = [RunCurves(label, read_metrics(p)) for label, p in zip(run_labels(run_dirs), run_dirs)]
    figure = build_figure(runs)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(output, dpi=100)
    except OSError as err:  # e.g. a directory that cannot be written
        raise MetricsError(f"-o {output}: cannot write it ({err.strerror or err})") from None
    return figure


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="pretrain-plot", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  pretrain-plot runs/default                      # writes metrics.png\n"
               "  pretrain-plot runs/a runs/b -o compare.png      # runs overlaid, one colour each")
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("-o", "--output", default="metrics.png",
                        help="image file to write; its suffix picks the format: .png, .pdf, .svg, ... "
                             "(default: metrics.png)")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.run_dirs, args.output)
    except MetricsError as err:
        fail("pretrain-plot", str(err))
    print(f"wrote {args.output}", flush=True)
    return Path(args.output)


def cli() -> None:
    main()


if __name__ == "__main__":
    cli()
