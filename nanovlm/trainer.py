"""The training loop: one plain PyTorch loop that serves every stage of training a VLM.

Each step: fetch grad_accum micro-batches, forward, loss (mean over the target tokens of the whole
step), backward, clip the gradient norm, an AdamW (or Muon + AdamW) update with a warmup + cosine
learning rate. Around it: periodic evaluation on held-out data, atomic checkpoints that hold everything
needed to continue exactly (model, optimizer, step, data position, random state), a metrics log and a
progress bar.

The stages of the literature are configurations of this one loop (`STAGES`, in config.py):
- "clip":     a contrastive image and text encoder (clip.CLIP) learns which caption goes with which image;
- "text":     the decoder learns the language of captions alone (images are not used);
- "align":    only the projector trains, with the ViT and decoder frozen (LLaVA stage 1);
- "full":     everything trains on image-caption pairs;
- "instruct": everything trains on question/answer pairs in a chat format.

Runs on a CPU as it is (AdamW fused on both); on a GPU it adds bf16 autocast and torch.compile; under
`torchrun --nproc_per_node=N` it uses DistributedDataParallel with the same global batch.
"""

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .config import TrainConfig
from .files import write_dir_atomically, write_file_atomically
from .muon import Muon
from .tokenizer import Tokenizer
from .vlm import IGNORE


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = True) -> "torch.optim.Optimizer | MuonAdamW":
    """AdamW over the trainable parameters; weight decay on matrices, not on biases and norms.

    With cfg.optimizer == "muon", the 2-D weight matrices inside the ViT and decoder blocks and the projector's
    go to Muon instead; embeddings (patch, position, token: the token one is also the output layer), biases
    and norms stay with AdamW. fused=True updates all AdamW parameters in one kernel (CPU and CUDA) instead of
    looping over the tensors, which for many small tensors is mostly the overhead of the loop.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    to_muon = {n for n, p in named if cfg.optimizer == "muon" and p.dim() == 2 and is_hidden_matrix(n)}
    hidden = [p for n, p in named if n in to_muon]
    rest = [p for n, p in named if n not in to_muon]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)
    if not hidden:
        return adamw
    # Muon scales each matrix's step to the size of an AdamW step (muon.rms_scale), so one learning rate suits both
    return MuonAdamW(Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay), adamw)


def is_hidden_matrix(name: str) -> bool:
    """A weight matrix that maps one hidden representation to another: what Muon is for."""
    return ".blocks." in name or name.startswith(("projector.", "resampler.in_proj", "xattn."))


class MuonAdamW:
    """Muon and AdamW stepped together, with the interface of one optimizer as far as the Trainer uses it.

    Muon (nanovlm/muon.py) keeps a momentum of each weight matrix's gradient and replaces it by a nearly
    orthogonal matrix (five Newton-Schulz iterations) before the update, so every direction of the matrix
    moves at the same rate instead of a few dominant ones.
    """

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:  # a property: load_state_dict replaces the groups' dicts
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def set_trainable(model: nn.Module, components: tuple[str, ...]) -> None:
    """Freeze everything except the named components (attributes of the model: modules or parameters)."""
    model.requires_grad_(False)
    for name in components:
        getattr(model, name).requires_grad_(True)


class Trainer:
    """Trains a VLM (or a CLIP) on batches from a loader.Loader; see the module docstring for what one step does."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, train_loader, val_loader, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train_loader, self.val_loader = train_loader, val_loader
        self.out = Path(cfg.out)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(resolve_device(cfg.device))
        self.amp_dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = model.to(self.device)  # the plain module: what gets saved, never a compiled wrapper
        # a stage names the components of every fusion (config.STAGES); train those this model has
        self.trained = [c for c in cfg.trained_components if hasattr(self.model, c)]
        set_trainable(self.model, self.trained)
        self.optimizer = make_optimizer(self.model, cfg)
        self.step_model = self._wrap(self.model)
        self.step = 0
        self.best_val = float("inf")
        self.samples_seen = 0

    def _wrap(self, model: nn.Module):
        """DDP under torchrun, then torch.compile where asked: the module used for training steps."""
        wrapped = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
        use_compile = self.cfg.compile == "on" or (self.cfg.compile == "auto" and self.device.type == "cuda")
        return torch.compile(wrapped) if use_compile else wrapped

    # ---- one optimizer step -------------------------------------------------------------------

    def train_step(self) -> float:
        """Run grad_accum micro-batches and one optimizer update; return the step's mean loss."""
        # batch k of the stream is a pure function of k, so the step alone says where the data is
        first = self.step * self.cfg.grad_accum
        batches = [self._to_device(self.train_loader.batch(first + i)) for i in range(self.cfg.grad_accum)]
        # normalise by the target tokens of the whole step on all processes, so that the loss (and the
        # gradient) is the same as one big batch on one process, whatever the caption lengths
        n_tokens = sum(self._count(b) for b in batches)
        if self.world > 1:
            dist.all_reduce(n_tokens)
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1  # DDP: all-reduce gradients on the last micro-batch only
            ctx = (
                self.step_model.no_sync()
                if self.world > 1 and not sync and hasattr(self.step_model, "no_sync")
                else nullcontext()
            )
            with ctx:
                loss_sum = self._loss_sum(batch)
                # DDP averages gradients over processes, so scale by the world size to get a sum
                (loss_sum * self.world / n_tokens).backward()
            total += loss_sum.detach()
        if self.world > 1:
            dist.all_reduce(total)
        loss = (total / n_tokens).item()
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            last = self.out / "last"
            then = (
                f"then run again to resume from the last good checkpoint, {last}"
                if last.exists()
                else "then run again (no checkpoint was written before it)"
            )
            raise FloatingPointError(
                f"loss became {loss} at step {self.step} (lr {lr:.2e}); stopped without updating the model. "
                f"Lower --lr or raise --warmup-steps, {then}"
            )
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.samples_seen += self.cfg.batch_size * self.cfg.grad_accum
        return loss

    def _loss_sum(self, batch: dict, model=None) -> torch.Tensor:
        """The batch's loss summed over what it averages (not the mean; see train_step): the cross-entropy of
        every target token, or for a contrastive model its loss times the number of image-caption pairs."""
        model = model or self.step_model
        images = None if self.cfg.task == "text" else batch["images"]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            if self.cfg.task == "contrastive":
                _, loss = model(images, batch["input_ids"])  # its negatives are the batch's other pairs
                return loss.float() * len(images)
            logits, _ = model(images, batch["input_ids"], words=batch.get("words"))  # words: a text stage's grid
        return F.cross_entropy(
            logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def _count(self, batch: dict) -> torch.Tensor:
        """How many terms _loss_sum adds up: target tokens, or image-caption pairs."""
        if self.cfg.task == "contrastive":
            return torch.tensor(float(len(batch["images"])), device=self.device)
        return (batch["targets"] != IGNORE).sum().float()

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per target token over cfg.eval_batches fixed held-out batches."""
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        for k in range(self.cfg.eval_batches):  # the same held-out batches every time
            batch = self._to_device(self.val_loader.batch(k))
            total += torch.stack([self._loss_sum(batch, self.model), self._count(batch)])
        if self.world > 1:
            dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self, until: int | None = None) -> dict:
        """Train to cfg.max_steps (or stop early at step `until`, saving a checkpoint); return the last log."""
        until = min(until or self.cfg.max_steps, self.cfg.max_steps)
        self.out.mkdir(parents=True, exist_ok=True)
        self._forget_log_after(self.step)  # lines of steps after this one come from a run that was cut short
        self.log(
            {
                "event": "start",
                "stage": self.cfg.stage,
                "training": self.trained,
                "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "frozen_params": sum(p.numel() for p in self.model.parameters() if not p.requires_grad),
                "device": str(self.device),
                "dtype": str(self.amp_dtype).removeprefix("torch."),
                "processes": self.world,
                "step": self.step,
            }
        )
        self.model.train()
        bar = tqdm(total=until, initial=self.step, desc=self.cfg.stage, disable=self.rank != 0, dynamic_ncols=True)
        record, t0, samples0 = {}, time.perf_counter(), self.samples_seen
        try:
            with CtrlC() as ctrl_c:
                while self.step < until:
                    loss = self.train_step()
                    bar.update(1)
                    if self.step % self.cfg.log_every == 0 or self.step == until:
                        rate = (self.samples_seen - samples0) / (time.perf_counter() - t0)
                        record = {
                            "step": self.step,
                            "loss": loss,
                            "lr": lr_at(self.step - 1, self.cfg),
                            "samples_per_s": rate,
                        }
                        if hasattr(self.model, "xattn"):  # cross fusion: how far each gate has opened
                            record["gates"] = [round(float(b.attn_gate.detach().tanh()), 5) for b in self.model.xattn]
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.1e}", sps=f"{rate:.0f}")
                        self.log(record)
                        t0, samples0 = time.perf_counter(), self.samples_seen
                    if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.max_steps:
                        self._evaluate_and_save()
                    if self._all_ranks_agree(ctrl_c.pressed):
                        # between two steps the state is whole: save it, so that a resume goes on exactly
                        self.save("last")
                        self.log({"event": "interrupted", "step": self.step})
                        raise KeyboardInterrupt
        finally:
            bar.close()
        if self.step == until and self.step % self.cfg.eval_every and self.step != self.cfg.max_steps:
            self.save("last")  # stopped early on purpose: leave a checkpoint to resume from
        return record

    def _all_ranks_agree(self, flag: bool) -> bool:
        """True on every process if it is true on any: all of them stop after the same step."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t.item())

    def _evaluate_and_save(self) -> None:
        val = self.evaluate()
        self.log({"step": self.step, "val_loss": val})
        if val < self.best_val:
            self.best_val = val
            self.save("best")
        self.save("last")

    def log(self, record: dict) -> None:
        """Append one JSON line to out/metrics.jsonl (rank 0 only)."""
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    # ---- checkpoints --------------------------------------------------------------------------

    def save(self, name: str) -> Path:
        """Write out/name atomically: model directory + trainer state, built beside it and swapped in."""
        target = self.out / name
        if self.rank != 0:
            return target
        state = {
            "step": self.step,
            "best_val": self.best_val,
            "samples_seen": self.samples_seen,
            "optimizer": self.optimizer.state_dict(),
            "train_config": asdict(self.cfg),
            "loader": {**self.train_loader.state_dict(), "step": self.step * self.cfg.grad_accum},
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        write_dir_atomically(
            target, lambda d: (self.model.save(d, self.tokenizer), torch.save(state, d / "trainer.pt"))
        )
        return target

    def resume(self, directory: str | Path) -> None:
        """Load model, optimizer, step, data position and random state written by save()."""
        directory = find_checkpoint(Path(directory))
        loaded, _ = type(self.model).load(directory, device=str(self.device))
        fusions = getattr(loaded.cfg, "fusion", None), getattr(self.model.cfg, "fusion", None)
        if fusions[0] != fusions[1]:
            raise ValueError(
                f"{directory} holds a model with {fusions[0]} fusion, this run builds {fusions[1]}; "
                f"give --fusion {fusions[0]} to resume it, or choose another --out"
            )
        if loaded.cfg != self.model.cfg:
            raise ValueError(
                f"{directory} holds a model of another configuration; "
                f"choose another --out (or delete {directory.parent})"
            )
        self.model.load_state_dict(loaded.state_dict())
        state = load_trainer_state(directory / "trainer.pt", self.device)
        if state["train_config"]["stage"] != self.cfg.stage:
            raise ValueError(f"{directory} is a {state['train_config']['stage']!r} run, not {self.cfg.stage!r}")
        optimizer = state["train_config"]["optimizer"]
        if optimizer != self.cfg.optimizer:
            raise ValueError(f"{directory} was trained with {optimizer}, not {self.cfg.optimizer}; set --optimizer")
        accum = state["train_config"].get("grad_accum")
        if accum != self.cfg.grad_accum:
            raise ValueError(f"{directory} was trained with --grad-accum {accum}, not {self.cfg.grad_accum}")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.train_loader.load_state_dict(state["loader"])
            self.step, self.best_val, self.samples_seen = state["step"], state["best_val"], state["samples_seen"]
            torch.set_rng_state(state["rng_cpu"].cpu())
            if state["rng_cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{directory / 'trainer.pt'} does not fit this run ({reason})") from e

    def _forget_log_after(self, step: int) -> None:
        """Drop the metrics lines of steps after `step`: this run logs them again."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) < len(lines):
            write_file_atomically(path, "".join(kept))


def _logged_step(line: str) -> float:
    """The step a metrics line belongs to; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line).get("step", -1)
    except json.JSONDecodeError:
        return math.inf


class CtrlC:
    """While active, Ctrl-C only sets .pressed, so the loop can stop between two steps; a second one stops at once.

    Outside the main thread (where Python cannot catch signals) it does nothing and Ctrl-C works as usual; where
    SIGINT is ignored (a background job, nohup) it stays ignored.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts wherever it lands
        print("\nstopping after this step (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:  # started to ignore Ctrl-C (nohup, a background job): it stays ignored
            return self
        # a handler installed outside Python (None) is replaced by Python's own when we are done
        self._previous = signal.default_int_handler if previous is None else previous
        signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)


def find_checkpoint(directory: Path) -> Path:
    """directory itself, or its .old twin if a crash came between the two renames of a save."""
    if (directory / "trainer.pt").is_file():
        return directory
    old = directory.with_name(directory.name + ".old")
    if (old / "trainer.pt").is_file():
        return old
    raise FileNotFoundError(
        f"no checkpoint to resume in {directory} (trainer.pt is missing); move {directory} away to start afresh"
    )


def resolve_device(name: str) -> str:
    if name == "auto":
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but this machine has no CUDA GPU; use --device cpu")
    return name


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in ("auto", "fp32", "bf16"):
        raise ValueError(f"unknown dtype {name!r}; use auto, fp32 or bf16")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def init_distributed() -> tuple[int, int]:
    """Join the process group when started by torchrun; returns (rank, world_size)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def load_trainer_state(path: Path, device: str | torch.device) -> dict:
    """Read a trainer.pt written by Trainer.save; a damaged or foreign file is a ValueError naming it."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then rejects
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except OSError:  # unreadable, e.g. no permission: its message names the file
        raise
    except Exception as e:  # torch.load fails on damaged bytes with many types; none of them runs code here
        # torch's own message for a rejected pickle advises weights_only=False, which would run the file's code
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}): it is cut short, damaged or not a nanovlm trainer state; "
            f"move {path.parent} away to start the run afresh"
        ) from e
    keys = ("step", "best_val", "samples_seen", "optimizer", "train_config", "loader", "rng_cpu", "rng_cuda")
    whole = isinstance(state, dict) and all(k in state for k in keys) and isinstance(state["train_config"], dict)
    if not whole or not all(k in state["train_config"] for k in ("stage", "optimizer")):
        raise ValueError(
            f"{path} is not a nanovlm trainer state (expected a dict with {list(keys)}); "
            f"move {path.parent} away to start the run afresh"
        )
    return state
