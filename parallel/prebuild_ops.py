"""Compiles DeepSpeed's CPU ops ahead of their first use: `python -m parallel.prebuild_ops`.

On a CPU machine DeepSpeed compiles two C++ extensions the first time a run
needs them: its shared-memory all-reduce (when any process group starts) and
its CPU Adam (ZeRO-Offload). Each takes about a minute on two cores, and lands
in the middle of whichever run comes first. The set-up (`make`) runs this
instead, as `DS_BUILD_OPS` would at install time; torch's extension cache keeps
the result. On a GPU machine there is nothing to do here: those ops are built
for the CPU accelerator only.
"""

from __future__ import annotations


def main() -> None:
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    build_shm_op()
    accelerator.create_op_builder("CPUAdamBuilder").load()


if __name__ == "__main__":
    main()
