"""The benchmark command: the FLOP count, and that every bench runs and reports what it promises.

No test here looks at a timing: figures depend on the machine and its load, so only their presence and
sign are checked.
"""

import json

import pytest
import torch.nn as nn

from nanovlm import bench, viz
from nanovlm.config import DataConfig, RunConfig, TrainConfig
from nanovlm.data import PackedSplit
from nanovlm.decoder import DecoderConfig
from nanovlm.pipeline import load_tokenizer
from nanovlm.projector import ProjectorConfig
from nanovlm.vit import ViTConfig
from nanovlm.vlm import VLM, VLMConfig

TRAIN_KEYS = {"samples_per_s", "tokens_per_s", "flops_per_sample", "flops_per_s", "peak_flops", "mfu", "step_s"}


def small_config(pixel_shuffle: int = 1, dec_layers: int = 1) -> VLMConfig:
    return VLMConfig(
        vit=ViTConfig(image_size=16, patch_size=8, dim=8, n_layers=1, n_heads=2),
        projector=ProjectorConfig(in_dim=8, out_dim=8, pixel_shuffle=pixel_shuffle),
        decoder=DecoderConfig(vocab_size=10, max_seq_len=16, dim=8, n_layers=dec_layers, n_heads=2),
    )


def small_run() -> RunConfig:
    run = RunConfig(
        data=DataConfig(image_size=16, vocab_size=50, max_text_len=6),
        model=VLMConfig(
            vit=ViTConfig(patch_size=8, dim=16, n_layers=1, n_heads=2),
            projector=ProjectorConfig(in_dim=16, out_dim=16, pixel_shuffle=2),
            decoder=DecoderConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2),
        ),
        train=TrainConfig(batch_size=4, warmup_steps=1),
    )
    return run.finalize()


@pytest.fixture(scope="module")
def small_peak() -> dict:
    return bench.bench_peak("cpu", sizes=(32, 64), repeats=1)


def test_model_flops_per_sample_matches_a_hand_count():
    # 16 px images of 8 px patches: 4 patches, no pixel shuffle: 4 image tokens; width 8; 3 text tokens
    vit = 8 * 8 * 3 * 8 + 12 * 8 * 8  # patch embedding + one block (qkv 3d^2, proj d^2, MLP 2 * 4d^2)
    projector = 8 * 16 + 16 * 8  # fc to 2 x out_dim, proj back
    decoder = 12 * 8 * 8  # one block
    head = 8 * 10  # vocabulary of 10
    matmuls = 6 * (4 * vit + 4 * projector + (4 + 3) * decoder + 3 * head)
    attention = 12 * 1 * 4**2 * 8 + 12 * 1 * (4 + 3) ** 2 * 8  # ViT over 4 patches, decoder over 7 positions
    assert matmuls + attention == 101376
    assert bench.model_flops_per_sample(small_config(), text_len=3) == 101376


def test_model_flops_per_sample_counts_every_linear_layer_of_the_model():
    cfg = small_config(pixel_shuffle=2, dec_layers=2)
    model, T = VLM(cfg), 5
    n_patches, n_img = cfg.vit.n_patches, cfg.n_image_tokens

    def weights(module: nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))

    matmuls = (
        n_patches * weights(model.vit)
        + n_img * weights(model.projector)
        + (n_img + T) * weights(model.decoder.blocks)
        + T * model.decoder.lm_head.weight.numel()
    )
    attention = 12 * (cfg.vit.n_layers * n_patches**2 * cfg.vit.dim + 2 * (n_img + T) ** 2 * cfg.decoder.dim)
    assert bench.model_flops_per_sample(cfg, T) == 6 * matmuls + attention


def test_model_flops_per_sample_scales_with_layers_and_text_length():
    d, V, n_img = 8, 10, 4
    one, two = small_config(dec_layers=1), small_config(dec_layers=2)
    S = n_img + 3
    layer = 6 * S * 12 * d * d + 12 * S**2 * d  # one more decoder block over S positions
    assert bench.model_flops_per_sample(two, 3) - bench.model_flops_per_sample(one, 3) == layer
    # one more text token: one more position through the blocks and the head, and a longer attention square
    longer = 6 * (12 * d * d + d * V) + 12 * d * ((S + 1) ** 2 - S**2)
    assert bench.model_flops_per_sample(one, 4) - bench.model_flops_per_sample(one, 3) == longer


def test_bench_peak_reports_positive_flops_per_dtype_and_size(small_peak):
    assert set(small_peak["flops"]) == {"fp32", "bf16"}
    assert all(rate > 0 for rates in small_peak["by_size"].values() for rate in rates.values())
    assert small_peak["flops"]["fp32"] == max(small_peak["by_size"]["fp32"].values())


@pytest.mark.parametrize("bf16", [False, True])
def test_bench_train_runs_real_steps_and_reports_rates(small_peak, bf16):
    run = small_run()
    row = bench.bench_train(run, bf16=bf16, steps=2, warmup=1, device="cpu", peak=small_peak)
    assert TRAIN_KEYS <= set(row)
    assert all(row[k] > 0 for k in TRAIN_KEYS)
    assert row["dtype"] == ("bf16" if bf16 else "fp32")
    # the peak: the sweep given, and sweeps between the timed steps and after them; the MFU is against the best
    sweeps = row["peak_sweeps"]
    assert sweeps[0] == small_peak["flops"][row["dtype"]] and len(sweeps) == 4 and min(sweeps) > 0
    assert row["peak_flops"] == max(sweeps) and row["mfu"] == pytest.approx(row["flops_per_s"] / max(sweeps))
    assert row["samples_per_s"] == pytest.approx(4 / row["step_s"])
    assert row["flops_per_sample"] == bench.model_flops_per_sample(run.model, 6)
    assert "random" in row["inputs"] and row["loss"] > 0
    assert "samples/s" in bench.format_train([row]) and "the spread of those sweeps" in bench.format_train([row])


def test_bench_generate_runs_past_max_seq_len_and_every_way_gives_the_same_tokens():
    cfg = small_config()  # max_seq_len 16 holds 4 image tokens + 1 prompt token + only 11 new tokens
    result = bench.bench_generate(cfg, batch_sizes=(1, 3), new_tokens=20, repeats=1, device="cpu")
    assert result["same_tokens"] == {"1": True, "3": True}
    modes = ["KV cache", "compiled", "recompute"]
    assert [(r["batch_size"], r["mode"]) for r in result["rows"]] == [(b, m) for b in (1, 3) for m in modes]
    for row in result["rows"]:
        assert row["new_tokens"] == 20
        assert row["latency_s"] > 0 and row["tokens_per_s"] > 0 and row["ms_per_token"] > 0
        assert ("compile_s" in row) == (row["mode"] == "compiled")
    latency = {(r["batch_size"], r["mode"]): r["latency_s"] for r in result["rows"]}
    assert result["speedup"] == {
        m: {str(b): pytest.approx(latency[b, "recompute"] / latency[b, m]) for b in (1, 3)} for m in modes[:2]
    }
    text = bench.format_generate(result)
    assert "same tokens every way (KV cache / compiled / recompute): batch 1: yes, batch 3: yes" in text
    assert "compiling the step (not in the latency): " in text


def test_bench_data_compares_the_loader_with_training(tiny_scenes):
    split = PackedSplit(tiny_scenes / "prepared" / "train_32")
    tokenizer = load_tokenizer(DataConfig(root=str(tiny_scenes), vocab_size=300), split)
    result = bench.bench_data(split, tokenizer, small_run(), train_samples_per_s=10.0, batches=2)
    assert result["loader_samples_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["loader_samples_per_s"] / 10.0)
    assert "ratio" in bench.format_data(result)


@pytest.fixture
def quick_peak(monkeypatch):
    """Make the command line's peak measurement tiny, so that a command test takes a second."""
    full = bench.bench_peak
    monkeypatch.setattr(bench, "bench_peak", lambda device, dtypes=("fp32", "bf16"): full(device, dtypes, (32,), 1))


def test_bench_train_json_has_samples_per_s_at_the_top(quick_peak, capsys):
    bench.cli(["bench", "train", "--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["samples_per_s"] > 0 and out["mfu"] > 0 and out["preset"] == "tiny"
    assert out["machine"]["threads"] >= 1 and len(out["machine"]["load_average"]) == 3
    assert set(out["peak"]["flops"]) == {"fp32", "bf16"}


def test_bench_train_plot_draws_one_bar_per_mode(quick_peak, tmp_path, capsys):
    png = tmp_path / "bench.png"
    bench.cli(["train", "--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch-size", "2", "--plot", str(png)])
    assert f"plot: {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = viz.plot_throughput(
        [
            {"compile": c, "dtype": d, "samples_per_s": 100.0 + i, "mfu": 0.1 * (i + 1)}
            for i, (c, d) in enumerate([(False, "float32"), (True, "bfloat16")])
        ],
        "two modes",
    )
    left, right = fig.axes
    assert [round(p.get_height(), 6) for p in left.patches] == [100.0, 101.0]
    assert [round(p.get_height(), 6) for p in right.patches] == [10.0, 20.0]
    assert [t.get_text() for t in left.get_xticklabels()] == ["eager\nfloat32", "compiled\nbfloat16"]


def test_bench_generate_prints_a_table_or_json(capsys):
    args = ["generate", "--preset", "tiny", "--batch-sizes", "2", "--new-tokens", "3", "--repeats", "1"]
    bench.cli(args)
    assert "same tokens every way (KV cache / compiled / recompute): batch 2: yes" in capsys.readouterr().out
    bench.cli([*args, "--json", "--no-compile"])
    out = json.loads(capsys.readouterr().out)
    assert out["generate"]["same_tokens"] == {"2": True}
    assert [(r["mode"], r["new_tokens"]) for r in out["generate"]["rows"]] == [("KV cache", 3), ("recompute", 3)]
    assert list(out["generate"]["speedup"]) == ["KV cache"]
