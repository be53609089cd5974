"""Cluster descriptions (`configs/cluster/<name>.yaml`): devices, their peak rates and memory, and links.

A cluster is nodes of `devices_per_node` identical devices. Inside a node the
devices talk over `intra_node` (NVLink/NVSwitch); nodes talk over `inter_node`
(InfiniBand or Ethernet), with the bandwidth each device gets. Bandwidths are
bytes per second in one direction, latencies seconds. The two measured
constants of the step-time model are `matmul_efficiency` and
`attention_efficiency` (the achieved fractions of peak FLOP/s on a transformer
layer's matrix products and in its attention kernel) and the host `overhead`s;
the rest is read off data sheets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import yaml

from common.typed_config import ConfigError, from_dict, require

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "configs" / "cluster"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int, key: str) -> int:
    """'80GiB', '40 GB', '512MiB' or a number of bytes → bytes; a one-line error naming `key` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}={text!r}: expected a size such as 80GiB, 40GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


@dataclass
class Link:
    bandwidth: float  # bytes/s per device, one direction
    latency: float  # seconds per message

    def __post_init__(self) -> None:
        require(self.bandwidth > 0 and self.latency >= 0,
                f"link bandwidth={self.bandwidth}, latency={self.latency}: expected > 0 and >= 0")


@dataclass
class Overhead:
    per_layer: float  # host seconds per transformer layer per micro-batch (forward and backward)
    per_step: float  # host seconds per optimizer step (optimizer launch, bookkeeping)


@dataclass
class PeakFlops:
    fp32: float
    bf16: float
    fp16: float


@dataclass
class ClusterConfig:
    name: str
    description: str
    device: Literal["cuda", "cpu"]  # which kernels run: they keep different activations
    devices_per_node: int
    device_memory: str
    peak_flops: PeakFlops  # dense FLOP/s per device, by training precision
    matmul_efficiency: float
    attention_efficiency: float  # the same for the attention kernel (flash / fused SDPA)
    memory_bandwidth: float  # bytes/s of device memory
    intra_node: Link
    inter_node: Link
    overhead: Overhead

    def __post_init__(self) -> None:
        require(self.devices_per_node >= 1, f"devices_per_node={self.devices_per_node}: expected >= 1")
        for key in ("matmul_efficiency", "attention_efficiency"):
            require(0 < getattr(self, key) <= 1, f"{key}={getattr(self, key)}: expected a fraction in (0, 1]")
        self.memory_bytes = parse_size(self.device_memory, "device_memory")

    def peak(self, precision: str) -> float:
        return getattr(self.peak_flops, precision)

    def link(self, ranks: int, stride: int) -> Link:
        """The link a group of `ranks` ranks, `stride` apart in rank order, crosses."""
        return self.intra_node if ranks * stride <= self.devices_per_node else self.inter_node


NESTED = {"peak_flops": PeakFlops, "intra_node": Link, "inter_node": Link, "overhead": Overhead}


def load_cluster(name_or_path: str) -> ClusterConfig:
    """A cluster by name (configs/cluster/<name>.yaml) or by the path of a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CLUSTER_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml")))
            raise ConfigError(f"--cluster={name_or_path}: unknown cluster; expected one of {known} "
                              "or the path of a cluster .yaml")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', None) or 'unreadable'}{where})") \
            from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the cluster description ({reason})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of cluster keys")
    for f in fields(ClusterConfig):
        if f.name not in values:
            raise ConfigError(f"{path}: missing key {f.name}")
        nested = NESTED.get(f.name)
        if nested is not None:
            if not isinstance(values[f.name], dict):
                raise ConfigError(f"{path}: {f.name}: expected a mapping")
            for sub in fields(nested):
                if sub.name not in values[f.name]:
                    raise ConfigError(f"{path}: missing key {f.name}.{sub.name}")
    try:
        return from_dict(ClusterConfig, values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
