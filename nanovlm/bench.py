"""Benchmarks: how fast nanovlm trains, generates and loads data here, next to this machine's own ceiling.

    python -m nanovlm bench peak                      matmul peak (fp32, bf16): the ceiling every MFU is against
    python -m nanovlm bench train --preset tiny       one real training step, timed: samples/s, FLOP/s, MFU
    python -m nanovlm bench train --compare           eager / torch.compile x fp32 / bf16 side by side
    python -m nanovlm bench generate                  KV cache (and compiled) vs recomputing, batch 1 and 64
    python -m nanovlm bench data                      prepared-data loading vs what training consumes
    python -m nanovlm bench all                       all of the above in one run

Every figure is measured now, on this machine; nothing is looked up. Training runs the real
`Trainer.train_step` (forward, loss, backward, gradient clipping, the preset's optimizer) on random
images and token ids of the preset's shape (or, with --real-data, on a Loader over the prepared scenes);
generation runs `VLM.generate` and `CompiledGenerator.generate` on a randomly initialised model. Warm-up
steps (and torch.compile's compilation) are not timed; step times are medians. Add --json for
machine-readable output. On a shared machine the figures move with the load: the load average is
printed with them.

One file on purpose, though longer than the others: every measurement shares the same timing, peak and
table code, and whoever compares two figures should find how both were taken in one place.
"""

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext, redirect_stdout
from functools import partial

import torch

from .compiled_generate import CompiledGenerator
from .config import (
    PRESETS,
    RunConfig,
    apply_overrides,
    device_or_auto,
    get_preset,
    nonnegative_int,
    positive_int,
    positive_ints,
)
from .cross_attention import n_cross_layers
from .data import PackedSplit
from .loader import Loader, loader_benchmark
from .tokenizer import Tokenizer
from .trainer import Trainer, resolve_device
from .vlm import FUSIONS, VLM, VLMConfig

NEVER = -1  # an end-of-text id that argmax never returns, so generation runs to max_new_tokens


# ----------------------------------------------------------------------------- what one sample costs


def model_flops_per_sample(cfg: VLMConfig, text_len: int) -> int:
    """Training FLOPs (forward + backward) for one image with text_len text tokens, counted from the config.

    A multiply-add is 2 FLOPs and the backward pass costs twice the forward, so a weight matrix that
    n tokens go through costs 6 x weights x n. Counted:
    - matmul weights x tokens: the ViT's patch embedding and each block's qkv, output projection and two
      MLP matrices on the N patches; the projector's two matrices on the N / s^2 image tokens; the
      decoder's blocks on the N_img + T positions; the (tied) lm head on the T text positions only, since
      image positions are never scored;
    - attention: Q K^T and A V are 2 x S^2 x d each per layer forward, so 12 x n_layers x S^2 x d forward
      + backward per sequence, for the ViT (S = N patches) and the decoder (S = N_img + T) separately.
      The causal decoder is counted over the whole S x S square, as PaLM's MFU does.
    Early fusion has no ViT and its projector reads raw patches. Cross fusion has no projector and no image
    positions in the decoder (S = T); its resampler's L latents read the N / s^2 merged patches (queries on L,
    keys and values on N / s^2 + L), and each gated layer's T text queries read the L latents (keys and values on L).
    Not counted: layer norms, GELU, softmax, embedding look-ups, cross-entropy and the optimizer
    update (AdamW is elementwise; Muon's Newton-Schulz products act on the weights, once per step, not per
    sample), nor that the images need no input gradient. The count assumes every
    component trains (the "full" and "instruct" stages).
    """
    vit, proj, dec = cfg.vit, cfg.projector, cfg.decoder
    n_patches, n_img = vit.n_patches, cfg.n_image_tokens
    seq = n_img + text_len  # decoder positions
    vit_weights = vit.patch_size**2 * vit.channels * vit.dim + vit.n_layers * _block_weights(vit.dim, vit.mlp_ratio)
    hidden = proj.hidden_mult * proj.out_dim
    proj_weights = proj.in_dim * proj.pixel_shuffle**2 * hidden + hidden * proj.out_dim
    dec_weights = dec.n_layers * _block_weights(dec.dim, dec.mlp_ratio)
    head_weights = dec.dim * dec.vocab_size
    matmuls = seq * dec_weights + text_len * head_weights  # weights x tokens, forward multiply-adds
    attention = dec.n_layers * seq**2 * dec.dim
    if cfg.fusion != "early":
        matmuls += n_patches * vit_weights
        attention += vit.n_layers * n_patches**2 * vit.dim
    if cfg.fusion != "cross":
        matmuls += n_img * proj_weights
    else:
        x = cfg.cross
        d, L, mlp = x.dim, x.n_latents, 2 * x.mlp_ratio * x.dim * x.dim
        n_x = n_cross_layers(dec.n_layers, x.every)
        n_feat = n_patches // x.pixel_shuffle**2  # merged s x s, each vision_dim wide
        matmuls += n_feat * x.vision_dim * d  # into the latents' width
        matmuls += x.resampler_layers * (L * (2 * d * d + mlp) + (n_feat + L) * 2 * d * d)
        matmuls += n_x * (text_len * (2 * d * d + mlp) + L * 2 * d * d)
        attention += x.resampler_layers * L * (n_feat + L) * d + n_x * text_len * L * d
    return 6 * matmuls + 12 * attention


def _block_weights(dim: int, mlp_ratio: int) -> int:
    """Weights in one transformer block's matmuls: qkv 3 d^2, output projection d^2, MLP 2 r d^2."""
    return (4 + 2 * mlp_ratio) * dim * dim


# ----------------------------------------------------------------------------- the ceiling


def machine_info(device: str) -> dict:
    """Which machine the figures come from, and how busy it was when they were taken."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {
        "device": device,
        "name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def bench_peak(
    device: str = "auto",
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    sizes: tuple[int, ...] | None = None,
    repeats: int = 5,
) -> dict:
    """Matmul FLOP/s of square n x n matrices per dtype and size, best of `repeats`; "flops" is the best size."""
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    sizes = sizes or ((1024, 2048, 4096, 8192) if cuda else (256, 512, 1024, 2048))
    by_size = {dt: {str(n): _matmul_flops(n, _DTYPES[dt], device, repeats) for n in sizes} for dt in dtypes}
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "flops": {dt: max(rates.values()) for dt, rates in by_size.items()},
        "by_size": by_size,
    }


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_SWEEPS = 3  # matmul sweeps among the timed training steps, besides the one before and the one after


def _matmul_flops(n: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """Best FLOP/s of (n, n) @ (n, n) over `repeats` timings of up to 20 products each."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    flops = 2 * n**3
    inner = min(20, max(1, round((2e12 if device.startswith("cuda") else 4e9) / flops)))
    torch.mm(a, b)  # warm-up: kernel selection, first-touch of the output
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return inner * flops / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- training


def preset_run(name: str, batch_size: int | None = None, fusion: str | None = None) -> RunConfig:
    """A preset (with another fusion if given), its dependent fields filled in and its tokenizer's vocabulary."""
    run = get_preset(name)
    if fusion:
        run = apply_overrides(run, {"fusion": fusion})
    run.finalize(vocab_size=run.data.vocab_size)  # the BPE tokenizer makes exactly this many ids
    if batch_size:
        run.train.batch_size = batch_size
    return run


def random_batches(run: RunConfig, n: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n batches shaped like the preset's Loader batches: random pixels in [0, 1], token ids and targets."""
    g = torch.Generator().manual_seed(seed)
    B, T, V, S = run.train.batch_size, run.data.max_text_len, run.model.decoder.vocab_size, run.data.image_size
    return [
        {
            "images": torch.rand(B, 3, S, S, generator=g),  # (B, 3, H, W)
            "input_ids": torch.randint(V, (B, T), generator=g),  # (B, T)
            "targets": torch.randint(V, (B, T), generator=g),  # (B, T)
        }
        for _ in range(n)
    ]


class Cycle:
    """Stands in for a loader.Loader: batch k is one of a few batches made in advance."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        return self.batches[k % len(self.batches)]


def prepared_train_split(run: RunConfig) -> tuple[PackedSplit, Tokenizer]:
    """The preset's packed training split and tokenizer, made first if missing."""
    from .pipeline import load_tokenizer, prepare_splits

    with redirect_stdout(sys.stderr):  # progress messages must not mix with the results (--json)
        split = prepare_splits(run.data)[run.data.train_split]
        return split, load_tokenizer(run.data, split)


def make_trainer(
    run: RunConfig, compile: bool = False, bf16: bool = False, device: str = "auto", real_data: bool = False
) -> tuple[Trainer, str]:
    """A real Trainer for the preset, fed random batches (or the prepared scenes); returns it and what it reads."""
    run = copy.deepcopy(run)
    if real_data:
        split, tokenizer = prepared_train_split(run)
        run.finalize(vocab_size=tokenizer.vocab_size)
        batches = Loader(
            split,
            tokenizer,
            run.train.batch_size,
            run.data.max_text_len,
            task=run.train.task,
            pairs=run.train.text_pairs,
        )
        inputs = f"{split.dir} via loader.Loader"
    else:
        batches = Cycle(random_batches(run))  # made once, so making them is not timed
        inputs = "random images and tokens of the preset's shape"
    cfg = dataclasses.replace(
        run.train, compile="on" if compile else "off", dtype="bf16" if bf16 else "fp32", device=device
    )
    if compile:
        torch.compiler.reset()  # each run compiles its own model from scratch
    torch.manual_seed(cfg.seed)
    return Trainer(VLM(run.model), None, batches, None, cfg), inputs


def bench_train(
    run: RunConfig,
    compile: bool = False,
    bf16: bool = False,
    steps: int = 10,
    warmup: int = 3,
    device: str = "auto",
    peak: dict | None = None,
    real_data: bool = False,
) -> dict:
    """Time `steps` real training steps after `warmup` untimed ones; samples/s, tokens/s, FLOP/s, MFU.

    tokens_per_s counts text tokens (T per sample); flops_per_s is model_flops_per_sample x samples/s and
    mfu divides it by the matmul peak of the step's dtype: the best of the sweep `peak` holds (measured now
    if not given) and of sweeps at its best size run between the timed steps, since a machine's peak moves
    with what else it runs; peak_sweeps lists them all, so the spread shows how far to trust the MFU.
    """
    trainer, inputs = make_trainer(run, compile, bf16, device, real_data)
    dtype = "bf16" if bf16 else "fp32"
    peak = peak if peak and dtype in peak["flops"] else bench_peak(str(trainer.device), (dtype,))
    best_n = int(max(peak["by_size"][dtype], key=peak["by_size"][dtype].get))
    start = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    warmup_s = time.perf_counter() - start
    times, loss, sweeps = [], float("nan"), [peak["flops"][dtype]]
    for i in range(steps):
        if i % max(1, steps // PEAK_SWEEPS) == 0:  # a few short sweeps spread over the timed steps
            sweeps.append(_matmul_flops(best_n, _DTYPES[dtype], str(trainer.device), 3))
        start = time.perf_counter()
        loss = trainer.train_step()  # ends with loss.item(), so a GPU has finished the step
        times.append(time.perf_counter() - start)
    sweeps.append(_matmul_flops(best_n, _DTYPES[dtype], str(trainer.device), 3))
    step_s = statistics.median(times)
    B, T, model_cfg = run.train.batch_size, run.data.max_text_len, trainer.model.cfg
    flops_per_sample = model_flops_per_sample(model_cfg, T)
    flops_per_s = flops_per_sample * B / step_s
    return {
        "inputs": inputs,
        "fusion": model_cfg.fusion,
        "device": str(trainer.device),
        "compile": compile,
        "dtype": dtype,
        "batch_size": B,
        "image_tokens": model_cfg.n_image_tokens,
        "decoder_positions": model_cfg.n_image_tokens + T,
        "text_len": T,
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "optimizer": run.train.optimizer,
        "steps": steps,
        "warmup_steps": warmup,
        "warmup_s": warmup_s,
        "step_s": step_s,
        "samples_per_s": B / step_s,
        "tokens_per_s": B * T / step_s,
        "flops_per_sample": flops_per_sample,
        "flops_per_s": flops_per_s,
        "peak_flops": max(sweeps),
        "peak_sweeps": sweeps,
        "mfu": flops_per_s / max(sweeps),
        "loss": loss,
    }


def profile_train(
    run: RunConfig, compile: bool = False, bf16: bool = False, steps: int = 3, warmup: int = 2, device: str = "auto"
) -> str:
    """torch.profiler over `steps` training steps after `warmup`: the ops that took the most self time."""
    from torch.profiler import ProfilerActivity, profile

    trainer, _ = make_trainer(run, compile, bf16, device)
    for _ in range(warmup):
        trainer.train_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.train_step()
    sort = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=20)


# ----------------------------------------------------------------------------- generation


GENERATE_MODES = ("KV cache", "compiled", "recompute")  # VLM.generate with and without its cache; CompiledGenerator


def bench_generate(
    cfg: VLMConfig,
    batch_sizes: tuple[int, ...] = (1, 64),
    new_tokens: int = 64,
    repeats: int = 3,
    device: str = "auto",
    bf16: bool = False,
    seed: int = 0,
    compiled: bool = True,
) -> dict:
    """Greedy captions of exactly new_tokens tokens three ways on a random model, same tokens each way.

    KV cache is VLM.generate; recompute is VLM.generate(use_cache=False), the whole sequence at every step;
    compiled is compiled_generate.CompiledGenerator, the cache at a fixed shape and each step one compiled
    graph (compiled=False leaves it out; its compilation is timed apart, as compile_s). The end-of-text id
    is one argmax never returns, so every caption runs to new_tokens; max_seq_len is raised if needed so that
    the image tokens, a one-token prompt and new_tokens fit. latency_s is the median time of one generate()
    call: what each caption of that batch waits.
    """
    device = resolve_device(device)
    cfg = copy.deepcopy(cfg)
    cfg.decoder.max_seq_len = max(cfg.decoder.max_seq_len, cfg.n_image_tokens + 1 + new_tokens)
    torch.manual_seed(seed)
    model = VLM(cfg).to(device).eval()
    ways = {
        "KV cache": model.generate,
        "compiled": CompiledGenerator(model).generate,
        "recompute": partial(model.generate, use_cache=False),
    }
    modes = [m for m in GENERATE_MODES if compiled or m != "compiled"]
    g = torch.Generator().manual_seed(seed)
    rows, same = [], {}
    for B in batch_sizes:
        S = cfg.vit.image_size
        images = torch.rand(B, cfg.vit.channels, S, S, generator=g).to(device)  # (B, 3, H, W)
        prompt = torch.randint(cfg.decoder.vocab_size, (B, 1), generator=g).to(device)  # (B, 1)
        tokens = {}
        for mode in modes:
            warmup, latency, tokens[mode] = _time_generate(ways[mode], images, prompt, new_tokens, repeats, bf16)
            n = sum(map(len, tokens[mode]))
            rows.append(
                {
                    "batch_size": B,
                    "mode": mode,
                    "new_tokens": n / B,
                    "latency_s": latency,
                    "ms_per_token": 1000 * latency / (n / B),
                    "tokens_per_s": n / latency,
                    **({"compile_s": warmup} if mode == "compiled" else {}),
                }
            )
        same[str(B)] = all(tokens[mode] == tokens["recompute"] for mode in modes)
    latency = {(r["batch_size"], r["mode"]): r["latency_s"] for r in rows}
    return {
        "device": device,
        "dtype": "bf16" if bf16 else "fp32",
        "inputs": "randomly initialised model, random images, one random prompt token",
        "image_tokens": cfg.n_image_tokens,
        "max_seq_len": cfg.decoder.max_seq_len,
        "rows": rows,
        # how many times faster than recomputing: per mode, per batch size
        "speedup": {
            mode: {str(B): latency[B, "recompute"] / latency[B, mode] for B in batch_sizes}
            for mode in modes
            if mode != "recompute"
        },
        "same_tokens": same,
    }


def _time_generate(generate, images, prompt, new_tokens, repeats, bf16) -> tuple[float, float, list[list[int]]]:
    """Seconds of a short warm-up (compilation, if any), median seconds of one call, and the last call's tokens."""
    amp = torch.autocast(images.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with amp:
        start = time.perf_counter()
        generate(images, prompt, 3, eot=NEVER)  # two decoding steps after the prompt: compiles the step once
        warmup = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = generate(images, prompt, new_tokens, eot=NEVER)  # .tolist() syncs
            times.append(time.perf_counter() - start)
    return warmup, statistics.median(times), out


# ----------------------------------------------------------------------------- data


def bench_data(split: PackedSplit, tokenizer, run: RunConfig, train_samples_per_s: float, batches: int = 50) -> dict:
    """Loader samples/s on a prepared split at the preset's batch shape, and how many times what training eats."""
    rate = loader_benchmark(
        split, tokenizer, run.train.batch_size, run.data.max_text_len, task=run.train.task, batches=batches
    )
    return {
        "split": str(split.dir),
        "images": len(split),
        "batch_size": run.train.batch_size,
        "text_len": run.data.max_text_len,
        "batches": batches,
        "loader_samples_per_s": rate,
        "train_samples_per_s": train_samples_per_s,
        "ratio": rate / train_samples_per_s,
    }


# ----------------------------------------------------------------------------- printing


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Columns right-aligned under their headers (the first one left-aligned)."""
    lines = [header, *rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]

    def cell(i: int, value) -> str:
        return str(value).ljust(widths[i]) if i == 0 else str(value).rjust(widths[i])

    return "\n".join("  " + "  ".join(cell(i, v) for i, v in enumerate(line)) for line in lines)


def format_machine(m: dict) -> str:
    load = " ".join(f"{x:.2f}" for x in m["load_average"])
    text = f"machine: {m['name']} ({m['device']}), {m['threads']} threads, torch {m['torch']}, load average {load}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if m["load_average"][0] >= cores:
        text += (
            f"\nwarning: the load average is {m['load_average'][0]:.1f} on {cores} cores: other processes share the "
            "CPU, so these figures are low and noisy (with several threads, each op also waits for threads that "
            "are not running); measure on an idle machine, or compare with --threads 1"
        )
    return text


def format_peak(p: dict) -> str:
    dts = list(p["by_size"])
    sizes = list(next(iter(p["by_size"].values())))
    rows = [[n] + [f"{p['by_size'][dt][n] / 1e9:.0f}" for dt in dts] for n in sizes]
    rows.append(["best"] + [f"{p['flops'][dt] / 1e9:.0f}" for dt in dts])
    head = f"matmul peak on {p['device']}, {p['threads']} threads, n x n @ n x n, best of {p['repeats']}"
    return head + "\n" + _table(["n"] + [f"{dt} GFLOP/s" for dt in dts], rows)


def format_train(rows: list[dict]) -> str:
    r0 = rows[0]
    by_fusion = len({r["fusion"] for r in rows}) > 1  # families side by side: their shapes differ row by row
    shape = (
        "shapes per row"
        if by_fusion
        else f"{r0['fusion']} fusion, {r0['params'] / 1e6:.2f}M params, {r0['image_tokens']} image + "
        f"{r0['text_len']} text tokens, {r0['flops_per_sample'] / 1e9:.3f} GFLOP per sample"
    )
    head = (
        f"training, preset {r0.get('preset', 'custom')}: batch {r0['batch_size']}, {shape} (model_flops_per_sample)\n"
        f"inputs: {r0['inputs']}; real Trainer.train_step (forward, loss, backward, clip, {r0['optimizer']}); "
        f"median of {r0['steps']} steps after {r0['warmup_steps']} warm-up\n"
        "peak: the best matmul GFLOP/s of the sweep above and of sweeps between the timed steps; the spread of "
        "those sweeps, "
        + "; ".join(
            f"{r['fusion'] + ' ' if by_fusion else ''}{_mode_name(r['compile'], r['dtype'] == 'bf16')} "
            f"{min(r['peak_sweeps']) / 1e9:.0f}-"
            f"{max(r['peak_sweeps']) / 1e9:.0f}"
            for r in rows
        )
    )
    table = [
        [
            *(
                (r["fusion"], f"{r['params'] / 1e6:.2f}", r["decoder_positions"], f"{r['flops_per_sample'] / 1e9:.3f}")
                if by_fusion
                else ()
            ),
            _mode_name(r["compile"], r["dtype"] == "bf16"),
            f"{r['warmup_s']:.1f}",
            f"{1000 * r['step_s']:.0f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['flops_per_s'] / 1e9:.1f}",
            f"{r['peak_flops'] / 1e9:.0f}",
            f"{100 * r['mfu']:.1f}%",
            f"{r['loss']:.3f}",
        ]
        for r in rows
    ]
    header = ["mode", "warm-up s", "step ms", "samples/s", "tokens/s", "GFLOP/s", "peak", "MFU", "loss"]
    if by_fusion:
        header = ["fusion", "params M", "decoder positions", "GFLOP/sample", *header]
    return head + "\n" + _table(header, table)


def format_generate(g: dict) -> str:
    head = (
        f"generation on {g['device']} ({g['dtype']}): {g['inputs']}; {g['image_tokens']} image tokens, "
        f"greedy, end-of-text disabled so every caption is {g['rows'][0]['new_tokens']:.0f} tokens"
    )
    rows = [
        [
            r["batch_size"],
            r["mode"],
            f"{r['latency_s']:.3f}",
            f"{r['ms_per_token']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{g['speedup'][r['mode']][str(r['batch_size'])]:.1f}x" if r["mode"] in g["speedup"] else "",
        ]
        for r in g["rows"]
    ]
    table = _table(["batch", "mode", "latency s", "ms/token", "tokens/s", "vs recompute"], rows)
    compile_s = [f"{r['compile_s']:.1f} s at batch {r['batch_size']}" for r in g["rows"] if "compile_s" in r]
    same = ", ".join(f"batch {b}: {'yes' if ok else 'NO'}" for b, ok in g["same_tokens"].items())
    modes = " / ".join(dict.fromkeys(r["mode"] for r in g["rows"]))
    notes = [table, f"same tokens every way ({modes}): {same}"]
    if compile_s:
        notes.append(f"compiling the step (not in the latency): {', '.join(compile_s)}")
    return "\n".join([head, *notes])


def format_data(d: dict) -> str:
    return (
        f"data: {d['split']} ({d['images']} images), batch {d['batch_size']}, {d['text_len']} text tokens\n"
        + _table(
            ["loader samples/s", f"training samples/s ({d.get('train_mode', 'as given')})", "ratio"],
            [[f"{d['loader_samples_per_s']:.0f}", f"{d['train_samples_per_s']:.1f}", f"{d['ratio']:.1f}x"]],
        )
    )


# ----------------------------------------------------------------------------- command line


def add_parser(sub) -> None:
    """Register `bench` and its sub-commands peak, train, generate, data, all."""
    p = sub.add_parser(
        "bench",
        help="measure training, generation and data speed against this machine's matmul peak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_subparsers(dest="what", required=True, metavar="{peak,train,generate,data,all}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--device", type=device_or_auto, default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ..."
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    common.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model and batch shape (tiny)")
    model.add_argument("--batch-size", type=positive_int, default=None, help="override the preset's batch size")
    model.add_argument(
        "--fusion",
        type=fusions,
        default=None,
        help="prefix, cross or early (default: the preset's); train takes several, e.g. prefix,cross,early",
    )
    steps = argparse.ArgumentParser(add_help=False)
    steps.add_argument("--steps", type=positive_int, default=10, help="timed training steps (median reported)")
    steps.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed training steps first (compilation)")
    gen = argparse.ArgumentParser(add_help=False)
    gen.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per caption")
    gen.add_argument(
        "--batch-sizes", type=positive_ints, default="1,64", help="comma-separated batch sizes for generation"
    )
    gen.add_argument("--repeats", type=positive_int, default=3, help="timed generate() calls (median reported)")
    gen.add_argument(
        "--no-compile", action="store_true", help="leave out the compiled fixed-shape cache (it compiles for seconds)"
    )
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--batches", type=positive_int, default=50, help="loader batches timed")

    what.add_parser("peak", parents=[common], help="matmul FLOP/s of this machine, fp32 and bf16")
    t = what.add_parser("train", parents=[common, model, steps], help="time real training steps")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast")
    t.add_argument("--compare", action="store_true", help="eager/compiled x fp32/bf16 side by side")
    t.add_argument("--real-data", action="store_true", help="read the prepared scenes instead of random inputs")
    t.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of a few steps")
    t.add_argument("--plot", metavar="PNG", default=None, help="also draw samples/s and MFU per mode into this file")
    g = what.add_parser("generate", parents=[common, model, gen], help="KV cache vs recomputation")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast")
    what.add_parser("data", parents=[common, model, steps, data], help="loader speed vs training speed")
    what.add_parser("all", parents=[common, model, steps, gen, data], help="everything, side by side")


def run(args) -> None:
    """Run the benchmark named by args.what and print its tables (or JSON)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = {"machine": machine_info(device)}
    text = [format_machine(out["machine"])]
    if args.what in ("peak", "train", "all"):
        out["peak"] = bench_peak(device)
        text.append(format_peak(out["peak"]))
    families = getattr(args, "fusion", None) or [None]  # None: the preset's own fusion
    if args.what in ("generate", "data", "all") and len(families) > 1:
        sys.exit(f"bench {args.what}: --fusion takes one fusion here; bench train compares several")
    if args.what != "peak":
        preset = preset_run(args.preset, args.batch_size, families[0])
    if args.what in ("train", "all"):
        modes = _COMPARE if args.what == "all" or args.compare else [(args.compile, args.bf16)]
        real = getattr(args, "real_data", False)
        out["train"] = [
            {"preset": args.preset, **bench_train(run, c, b, args.steps, args.warmup, device, out["peak"], real)}
            for run in [preset_run(args.preset, args.batch_size, f) for f in families]
            for c, b in modes
        ]
        text.append(format_train(out["train"]))
        if getattr(args, "plot", None):
            from .viz import plot_throughput  # matplotlib only when a plot is asked for

            m, r0 = out["machine"], out["train"][0]
            title = f"preset {args.preset}, batch {r0['batch_size']}, {m['name']}, {m['threads']} threads"
            plot_throughput(out["train"], title, args.plot)
            text.append(f"plot: {args.plot}")
        if getattr(args, "profile", False):
            out["profile"] = profile_train(preset, *modes[0], device=device)
            text.append(f"torch.profiler, {_mode_name(*modes[0])}, ops by self time:\n{out['profile']}")
    if args.what in ("generate", "all"):
        sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b)
        bf16 = getattr(args, "bf16", False)
        out["generate"] = bench_generate(
            preset.model, sizes, args.new_tokens, args.repeats, device, bf16, compiled=not args.no_compile
        )
        text.append(format_generate(out["generate"]))
    if args.what in ("data", "all"):
        out["data"] = _data_section(preset, args, device, out.get("train"))
        text.append(format_data(out["data"]))
    if args.what == "train" and len(out["train"]) == 1:  # one configuration: its figures at the top level
        out = {**out.pop("train")[0], **out}
    print(json.dumps(out, indent=2) if args.json else "\n\n".join(text), flush=True)


def fusions(text: str) -> list[str]:
    """Comma-separated fusion names, e.g. prefix,cross,early (argparse type)."""
    names = [t for t in text.split(",") if t]
    if not names or any(n not in FUSIONS for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: give fusions from {', '.join(FUSIONS)}, separated by commas")
    return names


def _mode_name(compile: bool, bf16: bool) -> str:
    return f"{'compiled' if compile else 'eager'} {'bf16' if bf16 else 'fp32'}"


_COMPARE = [(False, False), (False, True), (True, False), (True, True)]  # (compile, bf16)


def _data_section(preset: RunConfig, args, device: str, train_rows: list[dict] | None) -> dict:
    """Loader speed against the fastest training configuration measured (or an eager fp32 one, measured now)."""
    split, tokenizer = prepared_train_split(preset)
    rows = train_rows or [bench_train(preset, steps=args.steps, warmup=args.warmup, device=device)]
    fastest = max(rows, key=lambda r: r["samples_per_s"])
    result = bench_data(split, tokenizer, preset, fastest["samples_per_s"], args.batches)
    result["train_mode"] = _mode_name(fastest["compile"], fastest["dtype"] == "bf16")
    return result


def cli(argv: list[str] | None = None) -> None:
    """Run the bench command alone: cli(["train", "--preset", "tiny"]) (a leading "bench" is allowed)."""
    parser = argparse.ArgumentParser(prog="python -m nanovlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(argv or [])
    run(parser.parse_args(argv if argv[:1] == ["bench"] else ["bench", *argv]))
