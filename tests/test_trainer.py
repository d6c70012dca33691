"""The training loop: schedule, stages, checkpoints and exact resume, NaN handling, DDP, compile."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanovlm.config import DataConfig, TrainConfig
from nanovlm.data import PackedSplit
from nanovlm.decoder import DecoderConfig
from nanovlm.files import write_dir_atomically
from nanovlm.loader import Loader
from nanovlm.pipeline import load_tokenizer
from nanovlm.projector import ProjectorConfig
from nanovlm.trainer import Trainer, find_checkpoint, lr_at, make_optimizer
from nanovlm.vit import ViTConfig
from nanovlm.vlm import VLM, VLMConfig

TINY_FLAGS = (
    "--image-size 32 --vocab-size 300 --max-text-len 40 --vit-dim 32 --vit-n-layers 1 --vit-n-heads 2 "
    "--decoder-dim 32 --decoder-n-layers 1 --decoder-n-heads 2 --batch-size 8 --eval-batches 2 --log-every 1"
).split()


def make_trainer(root, out, stage="full", **overrides) -> Trainer:
    tok = load_tokenizer(DataConfig(root=str(root), vocab_size=300), PackedSplit(root / "prepared" / "train_32"))
    settings = dict(max_steps=12, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=4, eval_batches=2, log_every=1)
    cfg = TrainConfig(stage=stage, out=str(out), **{**settings, **overrides})
    torch.manual_seed(0)
    model = VLM(
        VLMConfig(
            vit=ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2),
            projector=ProjectorConfig(in_dim=32, out_dim=32),
            decoder=DecoderConfig(vocab_size=tok.vocab_size, max_seq_len=56, dim=32, n_layers=1, n_heads=2),
        )
    )
    train = Loader(PackedSplit(root / "prepared" / "train_32"), tok, 8, 40, task=cfg.task, seed=0)
    val = Loader(PackedSplit(root / "prepared" / "val_32"), tok, 8, 40, task=cfg.task, seed=1)
    return Trainer(model, tok, train, val, cfg)


def losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_weight_decay_only_on_matrices():
    model = VLM(VLMConfig(vit=ViTConfig(dim=32, n_heads=2, n_layers=1), projector=ProjectorConfig(32, 32),
                          decoder=DecoderConfig(dim=32, n_heads=2, n_layers=1, vocab_size=50)))  # fmt: skip
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), fused=False)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = VLM(VLMConfig(vit=ViTConfig(dim=32, n_heads=2, n_layers=1), projector=ProjectorConfig(32, 32),
                          decoder=DecoderConfig(dim=32, n_heads=2, n_layers=1, vocab_size=50)))  # fmt: skip
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    (muon,) = opt.muon.param_groups
    decay, no_decay = opt.adamw.param_groups
    assert sorted(names[id(p)] for p in muon["params"]) == [
        "decoder.blocks.0.attn.proj.weight", "decoder.blocks.0.attn.qkv.weight", "decoder.blocks.0.mlp.fc.weight",
        "decoder.blocks.0.mlp.proj.weight", "projector.fc.weight", "projector.proj.weight",
        "vit.blocks.0.attn.proj.weight", "vit.blocks.0.attn.qkv.weight", "vit.blocks.0.mlp.fc.weight",
        "vit.blocks.0.mlp.proj.weight",
    ]  # fmt: skip
    assert {names[id(p)] for p in decay["params"]} == {
        "vit.pos_embed", "vit.patch_embed.weight", "decoder.tok_embed.weight", "decoder.pos_embed.weight"
    }  # fmt: skip
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(muon["params"]) + len(decay["params"]) + len(no_decay["params"]) == len(names)
    for group in opt.param_groups:  # the trainer sets the learning rate of every group each step
        group["lr"] = 0.5
    assert muon["lr"] == decay["lr"] == no_decay["lr"] == 0.5


def test_bad_train_config_is_rejected():
    with pytest.raises(ValueError, match="unknown stage"):
        TrainConfig(stage="pretrain")
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="unknown components"):
        TrainConfig(train=("vit", "llm"))
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        TrainConfig(optimizer="sgd")


def test_training_lowers_the_loss(tiny_scenes, tmp_path):
    trainer = make_trainer(tiny_scenes, tmp_path)
    first = trainer.evaluate()
    trainer.fit()
    assert trainer.evaluate() < first - 0.5
    assert (tmp_path / "last" / "model.safetensors").is_file() and (tmp_path / "best" / "trainer.pt").is_file()
    start = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert start["event"] == "start" and start["training"] == ["vit", "projector", "decoder"]


@pytest.mark.parametrize("stage,trained", [("align", {"projector"}), ("text", {"decoder"})])
def test_stages_train_only_their_components(tiny_scenes, tmp_path, stage, trained):
    trainer = make_trainer(tiny_scenes, tmp_path, stage=stage, max_steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    changed = {n.split(".")[0] for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trained
    start = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert set(start["training"]) == trained and start["frozen_params"] > 0


@pytest.fixture
def terminal_sigint():
    """SIGINT handled as in a terminal (Python's KeyboardInterrupt), even where the tests run with it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_during_step(monkeypatch, at_step: int, presses: int = 1) -> None:
    """Send this process SIGINT `presses` times in the middle of the forward pass after step `at_step`."""
    real_loss_sum = Trainer._loss_sum

    def loss_sum(self, batch, model=None):
        if model is None and self.step == at_step:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return real_loss_sum(self, batch, model)

    monkeypatch.setattr(Trainer, "_loss_sum", loss_sum)


def one_line_per_step(out) -> bool:
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    return steps == sorted(set(steps))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ctrl_c_mid_step_finishes_the_step_saves_and_resumes_exactly(
    tiny_scenes, tmp_path, monkeypatch, optimizer, terminal_sigint
):
    straight = make_trainer(tiny_scenes, tmp_path / "a", optimizer=optimizer)
    straight.fit()

    interrupted = make_trainer(tiny_scenes, tmp_path / "b", optimizer=optimizer)
    ctrl_c_during_step(monkeypatch, at_step=6)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # fit() put Python's handler back
    state = torch.load(tmp_path / "b" / "last" / "trainer.pt", weights_only=True)
    assert state["step"] == 7 and state["loader"]["step"] == 7  # the step that was running, and no batch more

    with pytest.raises(ValueError, match="was trained with"):  # the other optimizer cannot take its state
        make_trainer(tiny_scenes, tmp_path / "c", optimizer={"adamw": "muon", "muon": "adamw"}[optimizer]).resume(
            tmp_path / "b" / "last"
        )
    resumed = make_trainer(tiny_scenes, tmp_path / "b", optimizer=optimizer)
    resumed.resume(tmp_path / "b" / "last")
    assert resumed.step == 7
    resumed.fit()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # exactly, every step
    assert one_line_per_step(tmp_path / "b")
    for p, q in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_second_ctrl_c_stops_at_once_and_resumes_from_the_periodic_checkpoint(
    tiny_scenes, tmp_path, monkeypatch, terminal_sigint
):
    straight = make_trainer(tiny_scenes, tmp_path / "a", grad_accum=2)
    straight.fit()
    interrupted = make_trainer(tiny_scenes, tmp_path / "b", grad_accum=2)
    ctrl_c_during_step(monkeypatch, at_step=6, presses=2)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "last" / "trainer.pt", weights_only=True)["step"] == 4  # the periodic one
    assert max(losses(tmp_path / "b")) == 6  # steps 5 and 6 were logged after it
    resumed = make_trainer(tiny_scenes, tmp_path / "b", grad_accum=2)
    resumed.resume(tmp_path / "b" / "last")
    assert resumed.step == 4
    resumed.fit(until=6)  # and once more: stop at step 6, resume from there
    resumed = make_trainer(tiny_scenes, tmp_path / "b", grad_accum=2)
    resumed.resume(tmp_path / "b" / "last")
    resumed.fit()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    assert one_line_per_step(tmp_path / "b")


def test_stop_early_and_resume_from_periodic_checkpoint(tiny_scenes, tmp_path):
    straight = make_trainer(tiny_scenes, tmp_path / "a")
    straight.fit()
    first = make_trainer(tiny_scenes, tmp_path / "b")
    first.fit(until=5)  # as if killed after step 5 (checkpoint written on stopping)
    second = make_trainer(tiny_scenes, tmp_path / "b")
    second.resume(tmp_path / "b" / "last")
    second.fit()
    assert losses(tmp_path / "b") == losses(tmp_path / "a")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tiny_scenes, tmp_path):
    trainer = make_trainer(tiny_scenes, tmp_path)
    real_batch = trainer.train_loader.batch

    def poisoned(k):
        batch = real_batch(k)
        if k == 6:
            batch["images"][:] = float("nan")
        return batch

    trainer.train_loader.batch = poisoned
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 6 .* last good checkpoint"):
        trainer.fit()
    saved, _ = VLM.load(tmp_path / "last")
    state = torch.load(tmp_path / "last" / "trainer.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_checkpoint_swap_is_atomic(tmp_path):
    target = tmp_path / "last"
    write_dir_atomically(target, lambda d: (d / "trainer.pt").write_text("one"))
    write_dir_atomically(target, lambda d: (d / "trainer.pt").write_text("two"))
    assert (target / "trainer.pt").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    # a crash between the two renames leaves only last.old: resuming finds it
    target.rename(tmp_path / "last.old")
    assert find_checkpoint(target) == tmp_path / "last.old"

    def crash(d):
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomically(tmp_path / "best", crash)
    assert not (tmp_path / "best").exists()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_names(tiny_scenes, tmp_path):
    """The CUDA default path (torch.compile) run on the CPU: same losses, no _orig_mod. in checkpoints."""
    eager = make_trainer(tiny_scenes, tmp_path / "eager", max_steps=4)
    eager.fit()
    compiled = make_trainer(tiny_scenes, tmp_path / "compiled", max_steps=4, compile="on")
    compiled.fit()
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a)
    from safetensors import safe_open

    with safe_open(tmp_path / "compiled" / "last" / "model.safetensors", "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())


def run_cli(args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tiny_scenes, tmp_path):
    # AdamW: Muon's Newton-Schulz runs in bf16 and turns the all-reduce's last-bit differences into 1e-4 ones
    common = ["train", "--data", str(tiny_scenes), "--max-steps", "6", "--eval-every", "3", "--no-report",
              "--optimizer", "adamw", *TINY_FLAGS]  # fmt: skip
    run_cli(["-m", "nanovlm", *common, "--out", str(tmp_path / "one")])
    run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanovlm", *common,
             "--out", str(tmp_path / "two")])  # fmt: skip
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys() == set(range(1, 7))
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    one, _ = VLM.load(tmp_path / "one" / "last")
    two, _ = VLM.load(tmp_path / "two" / "last")
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_cli_rejects_bad_arguments_with_a_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nanovlm", "train", "--max-steps", "ten"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "--max-steps 'ten': expected a int" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "nanovlm", "train", "--preset", "huge"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr


def train_until_signalled(command, out, sig, after_step, env):
    """Start `command`, send it `sig` once metrics.jsonl shows step `after_step`; return its exit code."""
    # the run starts with SIGINT handled as in a terminal, also where the tests run with it ignored (CI, nohup)
    terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=terminal)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and max(losses(out), default=0) >= after_step:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    proc.communicate(timeout=300)
    return proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_cli_run_interrupted_twice_ends_as_the_uninterrupted_one(tiny_scenes, tmp_path, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nanovlm", "train", "--data", str(tiny_scenes), "--max-steps", "30",
               "--eval-every", "10", "--no-report", *TINY_FLAGS]  # fmt: skip
    run_cli([*command[1:], "--out", str(tmp_path / "a")])
    out = tmp_path / "b"
    for after_step in (7, 18):
        code = train_until_signalled([*command, "--out", str(out)], out, sig, after_step, env)
        assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    run_cli([*command[1:], "--out", str(out)])
    assert losses(out) == losses(tmp_path / "a")
    assert one_line_per_step(out)
    a, _ = VLM.load(tmp_path / "a" / "last")
    b, _ = VLM.load(out / "last")
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_ctrl_c_stays_ignored_where_the_run_was_started_to_ignore_it(tiny_scenes, tmp_path, monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `nohup` or a background job of a script
    try:
        trainer = make_trainer(tiny_scenes, tmp_path)
        ctrl_c_during_step(monkeypatch, at_step=6)
        trainer.fit()  # not interrupted
        assert trainer.step == 12 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
