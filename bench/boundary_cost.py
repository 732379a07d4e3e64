"""What one expert boundary costs, against one training step.

A boundary is ``end_expert`` (finite check, slow update, merge ``W += s·B_slow·A_slow``) plus
``begin_expert`` (draw A, zero B, ``std(s·B_slow·A_slow)`` via r×r Grams, noise on W) plus a
fresh optimizer and scheduler.

    # time and extra peak memory vs matrix size d and number of adapted matrices (1 process)
    python bench/boundary_cost.py scaling --out bench/results/boundary_scaling.json
    # boundary vs training step of a Llama-shaped model under FSDP2, 1 and 2 processes (gloo)
    python bench/boundary_cost.py fsdp --out bench/results/boundary_fsdp.json
    python bench/boundary_cost.py scaling --smoke   # seconds, for CI
    # a whole Llama-2 on one device (random weights): step vs boundary, per merge_precision
    python bench/boundary_cost.py model --device cuda --dtype bf16 --shape 7b \
        --out bench/results/boundary_7b_gpu.json
    python bench/boundary_cost.py model --smoke     # tiny Llama on CPU, for CI

Timings are medians of repeats, on whatever machine runs them (the JSON records it). On CUDA
every timed region is bracketed by ``torch.cuda.synchronize()`` and memory is
``torch.cuda.max_memory_allocated``; on CPU memory is the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}


# ---- scaling: one process, synthetic stacks of adapted d×d matrices -------------------------

def _one_scaling_point(d: int, n: int, rank: int, repeats: int, tokens: int) -> dict:
    """Runs in a fresh subprocess so that ru_maxrss measures this configuration alone."""
    import torch
    from torch import nn
    from torchtune.modules.peft import LoRALinear

    from lorasc_tune.cascade import CascadeEngine
    from lorasc_tune.config import LoRASCConfig
    from lorasc_tune.plan import optimizer_param_groups

    torch.manual_seed(0)
    model = nn.Sequential(*[LoRALinear(d, d, rank=rank, alpha=2 * rank) for _ in range(n)])
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model:
        m.lora_a.weight.requires_grad_(True)
        m.lora_b.weight.requires_grad_(True)
    engine = CascadeEngine(model, LoRASCConfig(slow_alpha=0.5, noise_lambda=1.0), seed=0)
    engine.begin_expert()
    x = torch.randn(tokens, d)

    def train_step(opt):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    opt = torch.optim.AdamW(optimizer_param_groups(model, 1e-4, 1.0))
    train_step(opt)  # warm-up; B becomes non-zero so merges and noise are real work
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_times, boundary_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_step(opt)
        step_times.append(time.perf_counter() - t0)
    rss_after_steps = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.end_expert()
        engine.begin_expert()
        opt = torch.optim.AdamW(optimizer_param_groups(model, 1e-4, 1.0))
        boundary_times.append(time.perf_counter() - t0)
        train_step(opt)
    rss_after_boundaries = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights_mb = n * d * d * 4 / 2**20
    return {"d": d, "matrices": n, "rank": rank, "tokens_per_step": tokens,
            "boundary_s": statistics.median(boundary_times),
            "step_s": statistics.median(step_times),
            "boundary_over_step": statistics.median(boundary_times) / statistics.median(step_times),
            "adapted_weights_mb": weights_mb,
            # ru_maxrss is a high-water mark (KiB): what the boundaries added on top of steps.
            "boundary_extra_peak_mb": max(0, rss_after_boundaries - rss_after_steps) / 1024,
            "steps_peak_over_setup_mb": max(0, rss_after_steps - rss_before) / 1024}


def scaling(args) -> dict:
    points = []
    grid = [(512, 1), (1024, 1), (2048, 1), (4096, 1), (1024, 4), (1024, 16), (2048, 8)]
    if args.smoke:
        grid = [(64, 1), (64, 2)]
    for d, n in grid:
        code = (f"import json,sys; sys.path.insert(0,{str(REPO)!r}); "
                f"from bench.boundary_cost import _one_scaling_point as f; "
                f"print(json.dumps(f({d},{n},8,{args.repeats},{args.tokens})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        point = json.loads(out.stdout.strip().splitlines()[-1])
        points.append(point)
        print(f"d={d:5d} n={n:3d}  boundary {point['boundary_s'] * 1e3:8.1f} ms  "
              f"step {point['step_s'] * 1e3:8.1f} ms  ratio {point['boundary_over_step']:.2f}  "
              f"extra peak {point['boundary_extra_peak_mb']:.1f} MB "
              f"(weights {point['adapted_weights_mb']:.0f} MB)", flush=True)
    # Growth law: boundary time per weight element, assuming cost ∝ n·d².
    per_elem = [p["boundary_s"] / (p["matrices"] * p["d"] ** 2) for p in points]
    return {"machine": _machine(), "points": points,
            "seconds_per_weight_element_median": statistics.median(per_elem),
            "llama2_7b_qv_extrapolation_s": statistics.median(per_elem) * 64 * 4096 ** 2}


# ---- model: a whole Llama-2 on one device -------------------------------------------------


def _materialize_random(model, device) -> None:
    """Allocate a meta-built model on ``device`` with random N(0, 0.02) weights (no download);
    RoPE buffers are recomputed, as torchtune's recipes do after ``to_empty``."""
    import torch

    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()


LLAMA2_7B = dict(vocab_size=32000, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096,
                 intermediate_dim=11008, max_seq_len=4096, norm_eps=1e-5)
LLAMA2_TINY = dict(LLAMA2_7B, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=64,
                   intermediate_dim=128, vocab_size=512, max_seq_len=256)


def model_mode(args) -> dict:
    """Training step and expert boundary of a Llama-2 with LoRA r=8 on q,v, random weights.

    For each ``merge_precision`` a fresh engine runs boundaries (end_expert + begin_expert +
    a fresh AdamW) between timed training steps. "boundary extra peak" is the device memory
    a boundary allocates on top of what was allocated before it (CUDA: peak stats reset just
    before the boundary; CPU: not measurable in-process, reported as null).
    """
    import torch
    from torchtune import training
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from lorasc_tune.cascade import CascadeEngine
    from lorasc_tune.config import LoRASCConfig
    from lorasc_tune.plan import optimizer_param_groups

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cuda = device.type == "cuda"
    shape = LLAMA2_7B if args.shape == "7b" else LLAMA2_TINY
    torch.manual_seed(0)
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = lora_llama2(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16, **shape)
    _materialize_random(model, device)
    set_trainable_params(model, get_adapter_params(model))
    if args.act_ckpt:
        from torchtune.modules import TransformerSelfAttentionLayer

        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    tokens = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def allocated_mb(peak: bool) -> float:
        if cuda:
            f = torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated
            return f(device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def train_step(opt):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, shape["vocab_size"]).float(), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    points = []
    for policy in args.merge_precision:
        engine = CascadeEngine(model, LoRASCConfig(slow_alpha=0.5, noise_lambda=1.0,
                                                   merge_precision=policy), seed=0)
        engine.begin_expert()
        opt = torch.optim.AdamW(optimizer_param_groups(model, 1e-4, 1.0))
        train_step(opt)  # warm-up; B becomes non-zero so merges and noise are real work
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        steps, boundaries, extra = [], [], []
        for _ in range(args.repeats):
            sync()
            t0 = time.perf_counter()
            train_step(opt)
            sync()
            steps.append(time.perf_counter() - t0)
        step_peak = allocated_mb(peak=True)
        for _ in range(args.repeats):
            sync()
            before = allocated_mb(peak=False)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            engine.end_expert()
            engine.begin_expert()
            opt = torch.optim.AdamW(optimizer_param_groups(model, 1e-4, 1.0))
            sync()
            boundaries.append(time.perf_counter() - t0)
            if cuda:
                extra.append(allocated_mb(peak=True) - before)
            train_step(opt)
        step_s, boundary_s = statistics.median(steps), statistics.median(boundaries)
        point = {"merge_precision": policy, "step_s": step_s, "boundary_s": boundary_s,
                 "boundary_over_step": boundary_s / step_s,
                 "tokens_per_s": args.batch * args.seq / step_s,
                 "step_peak_mb": step_peak,
                 "boundary_extra_peak_mb": max(extra) if extra else None,
                 "adapted_matrices": len(engine.layers),
                 # False where the policy changed nothing (an fp32 base keeps no master)
                 "master_kept": any(m is not None for m in engine.master)}
        points.append(point)
        print(f"{policy:12s} step {step_s * 1e3:9.1f} ms  boundary {boundary_s * 1e3:9.1f} ms  "
              f"ratio {point['boundary_over_step']:.3f}  tok/s {point['tokens_per_s']:.0f}  "
              f"step peak {step_peak:.0f} MB  boundary extra "
              f"{point['boundary_extra_peak_mb'] if extra else 'n/a'} MB", flush=True)
        del engine, opt
    machine = _machine()
    if cuda:
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {"machine": machine, "shape": shape, "dtype": args.dtype, "batch": args.batch,
            "seq": args.seq, "act_ckpt": args.act_ckpt, "points": points}


# ---- fsdp: a Llama-shaped model under FSDP2, 1 and 2 processes ------------------------------

def _fsdp_worker(repeats: int) -> None:
    """Runs under torchrun: time training steps and boundaries of a sharded model."""
    from functools import partial

    import torch
    import torch.distributed as dist
    from torchtune import training
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from lorasc_tune.cascade import CascadeEngine
    from lorasc_tune.config import LoRASCConfig
    from lorasc_tune.plan import optimizer_param_groups

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    args = dict(vocab_size=32000, num_layers=4, num_heads=8, num_kv_heads=8, embed_dim=512,
                intermediate_dim=1376, max_seq_len=512)
    with torch.device("meta"):
        model = lora_llama2(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16, **args)
    set_trainable_params(model, get_adapter_params(model))
    training.shard_model(model, [partial(training.get_shard_conditions, names_to_match=None)],
                         cpu_offload=False)
    _materialize_random(model, "cpu")
    engine = CascadeEngine(model, LoRASCConfig(slow_alpha=0.5, noise_lambda=1.0), seed=0)
    engine.begin_expert()
    global_batch, seq = 4, 256
    tokens = torch.randint(0, 32000, (global_batch // world, seq),
                           generator=torch.Generator().manual_seed(rank))

    def train_step(opt):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32000),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    opt = torch.optim.AdamW(optimizer_param_groups(model, 1e-4, 1.0))
    train_step(opt)
    steps, boundaries = [], []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        train_step(opt)
        dist.barrier()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.end_expert()
        engine.begin_expert()
        opt = torch.optim.AdamW(optimizer_param_groups(model, 1e-4, 1.0))
        dist.barrier()
        boundaries.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"processes": world, "global_batch": global_batch, "seq": seq,
                          "adapted_matrices": len(engine.layers),
                          "step_s": statistics.median(steps),
                          "boundary_s": statistics.median(boundaries),
                          "boundary_over_step": statistics.median(boundaries) /
                          statistics.median(steps)}))
    dist.destroy_process_group()


def fsdp(args) -> dict:
    results = []
    for nproc in (1, 2):
        torchrun = Path(sys.executable).parent / "torchrun"
        code_path = Path(__file__).resolve()
        out = subprocess.run(
            [str(torchrun), "--standalone", "--nproc_per_node", str(nproc), str(code_path),
             "_fsdp_worker", "--repeats", str(args.repeats)],
            capture_output=True, text=True, cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)),
                 "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        point = json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])
        results.append(point)
        print(f"{nproc} process(es): step {point['step_s'] * 1e3:.1f} ms, boundary "
              f"{point['boundary_s'] * 1e3:.1f} ms, ratio {point['boundary_over_step']:.3f}",
              flush=True)
    return {"machine": _machine(), "points": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["scaling", "fsdp", "model", "_fsdp_worker"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per training step")
    parser.add_argument("--smoke", action="store_true")
    # model mode
    parser.add_argument("--device", default="cpu")
    # bf16 by default: with an fp32 base no policy keeps a master, so they would all be one.
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--shape", choices=["7b", "tiny"], default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--act-ckpt", action="store_true")
    parser.add_argument("--merge-precision", type=lambda t: t.split(","),
                        default=["nearest", "fp32_master"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.mode == "_fsdp_worker":
        _fsdp_worker(args.repeats)
        return
    if args.smoke:
        args.repeats, args.tokens, args.shape, args.seq = 2, 64, "tiny", 32
    result = {"scaling": scaling, "fsdp": fsdp, "model": model_mode}[args.mode](args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
