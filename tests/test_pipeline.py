"""The command line end to end: the main job, resuming it, captioning files, and the coco preset's smoke run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm import scenes
from nanovlm.data import PackedSplit, prepare
from nanovlm.loader import Loader
from nanovlm.vlm import VLM

SMALL_MODEL = (
    "--image-size 32 --vocab-size 300 --max-text-len 40 --vit-patch-size 8 --vit-dim 32 --vit-n-layers 1 "
    "--vit-n-heads 2 --projector-pixel-shuffle 2 --decoder-dim 32 --decoder-n-layers 1 --decoder-n-heads 2 "
    "--eval-batches 1 --log-every 1"
).split()


def cli(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "nanovlm", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_main_job_trains_reports_and_resumes(tiny_scenes, tmp_path):
    out = tmp_path / "run"
    first = cli("train", "--data", tiny_scenes, "--out", out, "--max-steps", 4, "--eval-every", 2, "--batch-size", 8,
                *SMALL_MODEL)  # fmt: skip
    assert "Captions for held-out 'test' images" in first.stdout
    assert "object F1 (size + colour + shape)" in first.stdout and "blind" in first.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 32 and 0 <= report["model"]["object_f1"] <= 1
    assert (out / "loss.png").is_file() and (out / "best" / "model.safetensors").is_file()
    # the same command again continues the finished run: nothing more to train, same report
    again = cli("train", "--data", tiny_scenes, "--out", out, "--max-steps", 4, "--eval-every", 2, "--batch-size", 8,
                "--no-report", *SMALL_MODEL)  # fmt: skip
    assert "resuming" in again.stdout and "at step 4 of 4" in again.stdout
    refused = cli("train", "--data", tiny_scenes, "--out", out, "--fresh", *SMALL_MODEL, check=False)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr


def test_caption_command_reads_any_image_file(tiny_scenes, tmp_path):
    out = tmp_path / "run"
    cli("train", "--data", tiny_scenes, "--out", out, "--max-steps", 2, "--eval-every", 2, "--batch-size", 8,
        "--no-report", *SMALL_MODEL)  # fmt: skip
    rgba = tmp_path / "scene.png"
    scene = scenes.sample_scene(__import__("random").Random(0), scenes.SceneConfig(), 0)
    Image.fromarray(scenes.render(scene)).convert("RGBA").save(rgba)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(np.full((50, 80), 128, np.uint8)).save(gray)
    result = cli("caption", rgba, gray, "--ckpt", out / "best")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(rgba)) and lines[1].startswith(str(gray))
    missing = cli("caption", tmp_path / "nope.png", "--ckpt", out / "best", check=False)
    assert missing.returncode == 2 and "nope.png" in missing.stderr


def test_token_loss_tool_accounts_for_every_target_token(tiny_scenes, tmp_path):
    out = tmp_path / "run"
    cli("train", "--data", tiny_scenes, "--out", out, "--max-steps", 2, "--eval-every", 2, "--batch-size", 8,
        "--no-report", *SMALL_MODEL)  # fmt: skip
    tool = Path(__file__).parent.parent / "tools" / "token_loss.py"
    result = subprocess.run(
        [sys.executable, tool, out / "best", "--data", tiny_scenes, "--n", "16", "--top", "1000"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.rsplit(maxsplit=4) for line in result.stdout.splitlines()[2:]]
    assert rows and all(len(r) == 5 for r in rows)
    shares, counts = [float(r[1].rstrip("%")) for r in rows], [int(r[4]) for r in rows]
    assert abs(sum(shares) - 100) < 0.1 * len(rows)  # every token's share, each rounded to 0.1 %
    assert shares == sorted(shares, reverse=True)
    model, tok = VLM.load(out / "best")
    loader = Loader(PackedSplit(prepare(tiny_scenes, "val", 32)), tok, 16, model.cfg.max_text_len,
                    first_caption_prob=1.0, seed=5)  # fmt: skip
    assert sum(counts) == int((loader.batch(0)["targets"] != -100).sum())


def write_tiny_coco(root, n=6):
    """A COCO-layout folder: train2017/ and val2017/ JPEGs with captions in the official JSON layout."""
    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(n):
            name = f"{i:012d}.jpg"
            Image.fromarray(rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8)).save(root / split / name)
            images.append({"id": i, "file_name": name, "width": 64, "height": 48 + i})
            for j in range(5):
                annotations.append({"id": i * 5 + j, "image_id": i, "caption": f"A photo of thing {i} number {j}."})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations})
        )


@pytest.mark.slow
def test_coco_preset_smoke_run_on_cpu(tmp_path):
    """The coco preset's code path (224 px, 8+8 layers) on a handful of images: trains, scores BLEU/CIDEr."""
    write_tiny_coco(tmp_path / "coco")
    result = cli("train", "--preset", "coco", "--data", tmp_path / "coco", "--out", tmp_path / "run", "--max-steps", 2,
                 "--batch-size", 2, "--eval-every", 2, "--eval-batches", 1, "--device", "cpu")  # fmt: skip
    assert "BLEU-4" in result.stdout or "bleu4" in result.stdout
    assert "object F1" not in result.stdout  # no scene records for COCO
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["n_images"] == 6 and "cider" in report["model"]


@pytest.mark.parametrize("folders", [("train2017", "val2017"), ("val2017",), ("train2017",)])
def test_data_coco_prepares_every_image_folder_present(tmp_path, folders):
    write_tiny_coco(tmp_path)
    for split in {"train2017", "val2017"} - set(folders):
        shutil.rmtree(tmp_path / split)
    result = cli("data", "coco", "--root", tmp_path, "--no-download", "--image-size", 32)
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == sorted(f"{s}_32" for s in folders)
    for split in folders:
        assert f"{split}: 6 images of 32px" in result.stdout


def test_a_dataset_drawn_with_another_size_is_used_and_named(tiny_scenes, capsys):
    from nanovlm.config import DataConfig
    from nanovlm.pipeline import prepare_splits

    splits = prepare_splits(DataConfig(root=str(tiny_scenes), image_size=32, n_train=60000))
    assert len(splits["train"]) == 128  # nothing redrawn: the tests' scenes are kept
    assert f"{tiny_scenes} holds 128 training scenes, not the 60000 asked for" in capsys.readouterr().err


CLIP_FLAGS = (
    "--image-size 32 --vocab-size 300 --max-text-len 40 --vit-patch-size 8 --vit-dim 32 --vit-n-layers 1 "
    "--vit-n-heads 2 --text-dim 32 --text-n-layers 1 --text-n-heads 2 --clip-embed-dim 16 --batch-size 16 "
    "--eval-batches 1 --log-every 1 --optimizer adamw"
).split()


@pytest.mark.slow
def test_clip_preset_trains_reports_and_starts_a_captioners_vit(tiny_scenes, tmp_path):
    result = cli("train", "--preset", "clip", "--data", tiny_scenes, "--out", tmp_path / "clip", "--max-steps", 4,
                 "--eval-every", 2, *CLIP_FLAGS)  # fmt: skip
    assert "text -> image" in result.stdout and "binding" in result.stdout and "color" in result.stdout
    report = json.loads((tmp_path / "clip" / "report.json").read_text())
    assert set(report) >= {"retrieval", "zeroshot", "swaps"}

    from nanovlm.clip import CLIP
    from nanovlm.pipeline import start_vision_from

    clip, _ = CLIP.load(tmp_path / "clip" / "best")
    # SMALL_MODEL's ViT settings are CLIP_FLAGS', so the captioner can start from the contrastive ViT
    cli("train", "--data", tiny_scenes, "--out", tmp_path / "cap", "--max-steps", 1, "--eval-every", 1,
        "--no-report", "--init-vision", tmp_path / "clip" / "best", *SMALL_MODEL)  # fmt: skip
    model, _ = VLM.load(tmp_path / "cap" / "best")
    assert model.cfg.vit == clip.cfg.vit
    start_vision_from(model, str(tmp_path / "clip" / "best"))
    for p, q in zip(model.vit.parameters(), clip.vit.parameters(), strict=True):
        assert torch.equal(p, q)
    wrong = cli("train", "--data", tiny_scenes, "--out", tmp_path / "bad", "--max-steps", 1, "--no-report",
                "--init-vision", tmp_path / "clip" / "best", *SMALL_MODEL, "--vit-dim", 64, check=False)  # fmt: skip
    errors = [line for line in wrong.stderr.splitlines() if line.startswith("error:")]
    assert wrong.returncode == 2 and len(errors) == 1 and "--init-vision" in errors[0]
    assert "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_clip_preset_on_coco_layout_reports_retrieval_only(tmp_path):
    write_tiny_coco(tmp_path / "coco")
    result = cli("train", "--preset", "clip", "--data", tmp_path / "coco", "--out", tmp_path / "run", "--max-steps", 2,
                 "--eval-every", 2, "--batch-size", 4, "--vocab-size", 300, "--image-size", 32, "--kind", "coco",
                 "--train-split", "train2017", "--val-split", "val2017", "--test-split", "val2017")  # fmt: skip
    assert "text -> image" in result.stdout and "binding" not in result.stdout


def test_instruct_preset_answers_keeps_captioning_and_asks(tiny_scenes, tmp_path):
    cap, inst = tmp_path / "cap", tmp_path / "inst"
    cli("train", "--data", tiny_scenes, "--out", cap, "--max-steps", 2, "--eval-every", 2, "--batch-size", 8,
        "--no-report", *SMALL_MODEL)  # fmt: skip
    result = cli("train", "--preset", "instruct", "--data", tiny_scenes, "--out", inst, "--init-from", cap / "best",
                 "--max-steps", 2, "--eval-every", 2, "--batch-size", 8, *SMALL_MODEL)  # fmt: skip
    assert "VQA accuracy" in result.stdout and "answer type yes/no" in result.stdout
    assert "VQA accuracy, relation questions" in result.stdout and "object F1" in result.stdout
    report = json.loads((inst / "report.json").read_text())
    assert set(report["vqa"]) >= {"model", "blind", "prior", "n_questions"} and "object_f1" in report["model"]
    image = tmp_path / "scene.png"
    Image.fromarray(PackedSplit(tiny_scenes / "prepared" / "test_32").images[0]).save(image)
    # a tiny model's context is short: two short questions with short answers fit
    asked = cli("ask", image, "what colour?", "how many?", "--max-new-tokens", 2, "--ckpt", inst / "best")
    assert asked.stdout.count("Q: ") == 2 and asked.stdout.count("A: ") == 2
    captioner = cli("ask", image, "what colour is it?", "--ckpt", cap / "best", check=False)
    assert captioner.returncode == 2 and "captions only" in captioner.stderr
    missing = cli("train", "--preset", "instruct", "--data", tiny_scenes, "--out", tmp_path / "x",
                  "--init-from", tmp_path / "nowhere", *SMALL_MODEL, check=False)  # fmt: skip
    assert missing.returncode == 2 and "--init-from" in missing.stderr and "no such folder" in missing.stderr


@pytest.mark.slow
def test_vqa_preset_trains_on_vqa_v2_data_without_captions(tiny_scenes, tmp_path):
    root = tmp_path / "vqa"
    (root / "annotations").mkdir(parents=True)
    for split, official in (("train", "train2014"), ("val", "val2014")):
        shutil.copytree(tiny_scenes / split, root / official)  # scenes name files by image id, as COCO does
        for kind, prefix in (("questions", "v2_OpenEnded_mscoco_"), ("annotations", "v2_mscoco_")):
            shutil.copy(tiny_scenes / "annotations" / f"vqa_{split}_{kind}.json",
                        root / "annotations" / f"{prefix}{official}_{kind}.json")  # fmt: skip
    packed = cli("data", "vqa", "--root", root, "--image-size", 32)
    assert packed.stdout.startswith("train2014: 128 images of 32px") and "val2014: 32 images" in packed.stdout
    result = cli("train", "--preset", "vqa", "--data", root, "--out", tmp_path / "run", "--max-steps", 2,
                 "--eval-every", 2, "--batch-size", 8, *SMALL_MODEL)  # fmt: skip
    assert "VQA accuracy" in result.stdout and "Captions for held-out" not in result.stdout
    scored = cli("eval", "--task", "vqa", "--ckpt", tmp_path / "run" / "best", "--data", root, "--split", "val2014",
                 "--train-split", "train2014", "--json")  # fmt: skip
    assert json.loads(scored.stdout)["prior"]["vqa_n"] > 0
