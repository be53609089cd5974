"""Training throughput and MFU of the Llama model under the DeepSpeed engine, on one device.

    python -m bench.gpu_throughput --model llama_1b --seq 2048 --micro-batch 16 --compile model
    python -m bench.gpu_throughput --device cpu --model tiny --seq 128 --steps 2   # smoke run

Runs the product's own path (megatron-core layers, `build_engine`, `train_step`)
on random tokens, so the number is what a real run gets minus data loading.
MFU uses model FLOPs (recomputation not counted), and the same run measures a
large dense matrix product as the reference for "what this device gives".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
H100_BF16_DENSE_TFLOPS = 989.0  # datasheet, dense (no sparsity); the H200 has the same peak
FORMULA = ("FLOPs/token = 6*N + 12*L*h*s  (N: parameters outside the input embedding, "
           "output layer counted even when tied; attention counted as full, not causal: "
           "PaLM/Megatron convention)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a configs/model preset name or a YAML path")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--zero", type=int, default=1, choices=(0, 1))
    p.add_argument("--compile", nargs="?", const="layers", default="none",
                   choices=("none", "layers", "model"),
                   help="torch.compile each transformer layer, or the whole model with its loss")
    p.add_argument("--sdpa", choices=("auto", "flash", "cudnn", "efficient"), default="auto",
                   help="allow only this attention kernel (fails if it cannot run these shapes)")
    p.add_argument("--recompute", choices=("none", "full", "selective"), default="none")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"peak for MFU; default {H100_BF16_DENSE_TFLOPS} on cuda, none on cpu")
    p.add_argument("--profile", action="store_true", help="print the top kernels of one step")
    return p.parse_args()


def load_model_config(name: str, vocab: int, seq: int):
    from pretrain.config import ModelConfig, from_dict

    path = Path(name) if name.endswith(".yaml") else REPO / "configs" / "model" / f"{name}.yaml"
    cfg = from_dict(ModelConfig, yaml.safe_load(path.read_text()))
    # The presets leave the vocabulary to the tokenizer; a benchmark may also ask
    # for a longer sequence than a preset was meant for (rotary angles are computed
    # for any length).
    return dataclasses.replace(cfg, vocab_size=vocab, max_seq_len=max(cfg.max_seq_len, seq))


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Rate of one large dense matrix product: the ceiling measured in this run."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batches(vocab: int, batch: int, seq: int, device: torch.device, count: int = 4):
    """Cycles over a few device-resident batches: no host work inside the timed steps."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    pool = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        pool.append({"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device)})
    i = 0
    while True:
        yield pool[i % count]
        i += 1


def main() -> None:
    args = parse_args()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    # DeepSpeed picks its accelerator at import; only the client AdamW is used, so no op is built.
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    from parallel.compile import compile_model
    from parallel.engine import EngineOptions, build_engine, clips_in_loop
    from parallel.step import train_step
    from parallel.groups import destroy_process_groups, init_process_groups
    from parallel.rng import seed_model_parallel_rng
    from pretrain.config import Config, DataConfig, OptimConfig, ParallelConfig, TrainerConfig
    from pretrain.model.llama import LlamaModel, transformer_config
    from pretrain.model.flops import matmul_params
    from pretrain.model.flops import flops_per_token as model_flops_per_token
    from pretrain.training.optim import build_optimizer, build_scheduler
    from pretrain.model.build import LAYER_TYPES

    precision = "bf16" if device.type == "cuda" else "fp32"  # CPU: a smoke run, not a number
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    init_process_groups(1, 1, device)
    torch.manual_seed(1234)
    seed_model_parallel_rng(1234, device)  # megatron-core's recomputation forks this stream

    mcfg = load_model_config(args.model, args.vocab, args.seq)
    padded_vocab = mcfg.padded_vocab_size(args.vocab)
    recompute = None if args.recompute == "none" else args.recompute
    model = LlamaModel(mcfg, transformer_config(mcfg, params_dtype=dtype, recompute=recompute),
                       padded_vocab)
    cfg = Config(
        model=mcfg,
        data=DataConfig(seq_len=args.seq),
        parallel=ParallelConfig(precision=precision, zero_stage=args.zero),
        # Random tokens: a small constant rate keeps the loss near ln(vocab) instead of diverging.
        optim=OptimConfig(lr=3e-4, min_lr=3e-4, warmup_steps=0, schedule="constant"),
        trainer=TrainerConfig(micro_batch_size=args.micro_batch,
                              global_batch_size=args.micro_batch * args.grad_accum,
                              train_steps=args.warmup + args.steps),
    )
    optimizer = build_optimizer(model, cfg.optim, device)
    scheduler = build_scheduler(cfg.optim, cfg.trainer.train_steps)
    options = EngineOptions(micro_batch_size=cfg.trainer.micro_batch_size,
                            global_batch_size=cfg.trainer.global_batch_size, grad_clip=cfg.optim.grad_clip)
    engine = build_engine(model, optimizer, scheduler, cfg.parallel, options, data_parallel=1)
    compile_model(engine.module, args.compile, LAYER_TYPES)
    if args.sdpa != "auto":
        wanted = {"efficient": "mem_efficient"}.get(args.sdpa, args.sdpa)
        for backend in ("flash", "cudnn", "mem_efficient", "math"):
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(backend == wanted)
    clip = cfg.optim.grad_clip if clips_in_loop(cfg.parallel) else 0.0
    batches = random_batches(args.vocab, args.micro_batch, args.seq, device)

    flops_token = model_flops_per_token(mcfg, args.seq, padded_vocab)
    n_params = matmul_params(mcfg, padded_vocab)
    tokens_step = args.micro_batch * args.grad_accum * args.seq
    print(f"model {mcfg.name}: {mcfg.num_layers} layers x {mcfg.hidden_size}, "
          f"ffn {mcfg.ffn_hidden_size}, "
          f"heads {mcfg.num_attention_heads}/{mcfg.query_groups} kv, vocab {padded_vocab}, "
          f"N = {n_params / 1e6:.1f}M; seq {args.seq}, micro-batch {args.micro_batch} "
          f"x accum {args.grad_accum}; {precision}, ZeRO-{args.zero}, compile={args.compile}, "
          f"sdpa={args.sdpa}, recompute={args.recompute}; "
          f"optimizer {type(engine.optimizer).__name__}", flush=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        loss, _ = train_step(engine, batches, device, clip)
    sync(device)
    print(f"warm-up: {args.warmup} steps in {time.perf_counter() - start:.1f} s, "
          f"loss {loss.item():.3f}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step_times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        loss, _ = train_step(engine, batches, device, clip)  # the grad norm read also syncs
        sync(device)
        step_times.append(time.perf_counter() - start)

    step = statistics.median(step_times)
    tokens_s = tokens_step / step
    tflops = flops_token * tokens_s / 1e12
    peak = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    reference = matmul_tflops(device, dtype)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = (float("nan"), float("nan"))
    if device.type == "cuda":
        memory = (torch.cuda.max_memory_allocated(device) / 2**30,
                  torch.cuda.max_memory_reserved(device) / 2**30)

    print(FORMULA)
    print(f"  = {flops_token / 1e9:.3f} GFLOP/token ({6 * n_params / flops_token:.0%} from 6N)")
    print(f"device {gpu}; loss {loss.item():.3f} after {args.warmup + args.steps} steps")
    print(f"step time     {step * 1e3:9.1f} ms  (median of {args.steps}; "
          f"min {min(step_times) * 1e3:.1f}, "
          f"max {max(step_times) * 1e3:.1f})")
    print(f"tokens/s      {tokens_s:9.0f}")
    print(f"achieved      {tflops:9.4g} TFLOP/s")
    if peak:
        print(f"MFU           {tflops / peak:9.1%}  of {peak:.0f} TFLOP/s {dtype} dense peak")
    print(f"ratio         {tflops / reference:9.3f}  x the {reference:.4g} TFLOP/s of an "
          f"{'8192' if device.type == 'cuda' else '1024'}^3 {dtype} matmul measured in this run")
    print(f"peak memory   {memory[0]:9.1f} GiB allocated, {memory[1]:.1f} GiB reserved")
    print("RESULT " + json.dumps({
        "model": mcfg.name, "seq": args.seq, "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum, "zero": args.zero, "compile": args.compile,
        "sdpa": args.sdpa, "recompute": args.recompute, "device": gpu,
        "step_ms": round(step * 1e3, 1), "tokens_s": round(tokens_s), "tflops": round(tflops, 3),
        "mfu": round(tflops / peak, 4) if peak else None, "matmul_tflops": round(reference, 1),
        "mem_gib": round(memory[0], 1)}), flush=True)

    if args.profile:
        profile_step(engine, batches, device, clip)
    destroy_process_groups()


def profile_step(engine, batches, device: torch.device, clip: float) -> None:
    """Top kernels of one step: shows which attention kernel SDPA chose and where time goes."""
    from torch.profiler import ProfilerActivity, profile

    from parallel.step import train_step

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(engine, batches, device, clip)
        sync(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
