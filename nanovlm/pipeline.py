"""The main job, end to end: data -> tokenizer -> model -> training -> report.

`python -m nanovlm train --preset scenes` calls `run()`: it generates the scenes if they are missing,
prepares (packs) every split once, trains the BPE tokenizer on the training captions once, trains the
model, then captions held-out images and prints them next to the truth with the final scores.
"""

import gc
import json
import math
import sys
import time
from pathlib import Path

import regex
import torch
import torch.distributed as dist

from . import scenes
from .clip import CLIP, CLIPConfig
from .config import DataConfig, RunConfig
from .data import PackedSplit, prepare
from .evaluate import evaluate_split, format_vqa_report, score_table, vqa_report
from .files import write_file_atomically
from .loader import Loader
from .tokenizer import SPLIT_PATTERN, Tokenizer
from .trainer import Trainer, init_distributed
from .vlm import VLM


def prepare_splits(data: DataConfig) -> dict[str, PackedSplit]:
    """Generate (scenes) and pack the train, val and test splits; work already done is skipped."""
    root = Path(data.root)
    if data.kind == "scenes":
        # a dataset already there keeps its own config (generate redoes it only if the code's format changed);
        # any --image-size is then packed from the same pictures
        marker = root / "done"
        if marker.is_file():
            cfg = _stored_scene_config(marker)
            if cfg.n_train != data.n_train:
                print(
                    f"note: {root} holds {cfg.n_train} training scenes, not the {data.n_train} asked for; using "
                    f"them as they are (delete {root} to draw {data.n_train})",
                    file=sys.stderr,
                )
        else:
            cfg = scenes.SceneConfig(image_size=data.image_size, n_train=data.n_train)
        scenes.generate(root, cfg)
    elif not (root / "annotations").is_dir() and data.kind == "vqa":
        raise FileNotFoundError(
            f"{root / 'annotations'} not found: put the VQA v2 questions and annotations there, the images in "
            f"{root}/SPLIT/ (data/README.md shows the layout)"
        )
    elif not (root / "annotations").is_dir():
        raise FileNotFoundError(
            f"{root / 'annotations'} not found: fetch COCO first with `python -m nanovlm data coco --root {root}` "
            "(or unzip the official 2017 files there by hand)"
        )
    names = dict.fromkeys([data.train_split, data.val_split, data.test_split])
    return {name: PackedSplit(prepare(root, name, data.image_size)) for name in names}


def _stored_scene_config(marker: Path) -> scenes.SceneConfig:
    """The config a finished scenes dataset was drawn with, from the `done` marker scenes.generate writes."""
    try:
        stored = json.loads(marker.read_text(encoding="utf-8"))["config"]
        return scenes.SceneConfig(**{k: _tuples(v) for k, v in stored.items()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, not an object, unknown fields
        why = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{marker} is damaged ({type(e).__name__}: {why}); delete it and the scenes are drawn again"
        ) from e


def _tuples(value):
    """JSON lists back into the tuples a config holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_tokenizer(data: DataConfig, train: PackedSplit) -> Tokenizer:
    """The BPE tokenizer of this dataset: trained once on the training captions (and questions), then cached."""
    path = Path(data.root) / f"tokenizer-{data.vocab_size}.tiktoken"
    texts = [c for caps in train.captions for c in caps]
    texts += [f"{q['question']} {q['answer']}" for q in train.qa or []]
    if path.is_file():
        try:
            tokenizer = Tokenizer.load(path)
        except ValueError as e:
            raise ValueError(f"{e}; delete it to train the tokenizer again") from e
        if tokenizer.vocab_size == data.vocab_size or _learned_every_word(tokenizer, texts):
            return tokenizer
        raise ValueError(
            f"{path} holds {tokenizer.vocab_size} of the {data.vocab_size} tokens asked for, yet some words of the "
            "training captions are still split: the file was cut short; delete it to train the tokenizer again"
        )
    tokenizer = Tokenizer.train(texts, vocab_size=data.vocab_size)
    write_file_atomically(path, tokenizer.save)
    return tokenizer


def _learned_every_word(tokenizer: Tokenizer, texts: list[str]) -> bool:
    """Whether every word of texts is one token: only then does training stop short of the vocab_size asked."""
    words = {word for text in texts for word in regex.findall(SPLIT_PATTERN, text)}
    return all(word.encode("utf-8") in tokenizer.mergeable_ranks for word in words)


def make_loaders(run: RunConfig, tokenizer: Tokenizer, splits: dict[str, PackedSplit], rank: int, world: int):
    """Training and validation loaders; each process gets its slice of the global batch."""
    t, d = run.train, run.data
    if t.batch_size % world:
        raise ValueError(f"--batch-size {t.batch_size} does not divide over {world} processes")
    task = "caption" if t.task == "contrastive" else t.task  # a contrastive model reads image-caption pairs too
    kwargs = dict(tokenizer=tokenizer, batch_size=t.batch_size // world, max_len=d.max_text_len, task=task)
    kwargs.update(rank=rank, world_size=world, caption_prob=t.caption_prob, pairs=t.text_pairs)
    if t.text_grid:
        side = math.isqrt(run.model.n_image_tokens)
        if side == 0 or side * side != run.model.n_image_tokens:  # cross fusion has no image tokens in front
            raise ValueError(
                f"--text-grid lays words out where a square of image tokens goes in front of the text; this model "
                f"({run.model.fusion} fusion, {run.model.n_image_tokens} image tokens) has none"
            )
        kwargs["grid"] = side
    first = t.first_caption_prob or None
    train = Loader(splits[d.train_split], seed=t.seed, first_caption_prob=first, **kwargs)
    val = Loader(splits[d.val_split], seed=t.seed + 1, first_caption_prob=first, **kwargs)  # same caption mix
    return train, val


def run(cfg: RunConfig, fresh: bool = False, report: bool = True) -> Path:
    """Train cfg end to end and return the output folder (holding last/, best/, metrics.jsonl, report.json)."""
    rank, world = init_distributed()
    t0 = time.perf_counter()
    if rank == 0:
        splits = prepare_splits(cfg.data)
        tokenizer = load_tokenizer(cfg.data, splits[cfg.data.train_split])
    if world > 1:
        dist.barrier()  # rank 0 made the files; the others now only read them
    if rank != 0:
        splits = prepare_splits(cfg.data)
        tokenizer = load_tokenizer(cfg.data, splits[cfg.data.train_split])
    cfg.finalize(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(cfg.train.seed)
    model = CLIP(cfg.model) if isinstance(cfg.model, CLIPConfig) else VLM(cfg.model)
    if cfg.train.init_from:
        start_from(model, cfg.train.init_from, tokenizer)
    if cfg.train.init_vision:
        start_vision_from(model, cfg.train.init_vision)
    trainer = Trainer(model, tokenizer, *make_loaders(cfg, tokenizer, splits, rank, world), cfg.train)
    out = Path(cfg.train.out)
    if (out / "last").exists() or (out / "last.old").exists():
        if fresh:
            raise FileExistsError(f"{out} already holds a run; delete it or choose another --out")
        trainer.resume(out / "last")
        say(rank, f"resuming {out / 'last'} at step {trainer.step} of {cfg.train.max_steps}")
    say(rank, describe(cfg, model, tokenizer, splits))
    trainer.fit()
    if rank == 0:
        (out / "config.json").write_text(json.dumps(_as_dict(cfg), indent=2))
        from .viz import plot_losses

        plot_losses(out / "metrics.jsonl", out / "loss.png")
    if report and rank == 0 and isinstance(model, CLIP):
        from .clip_eval import evaluate_clip, format_clip_report

        best, _ = CLIP.load(out / "best", device=str(trainer.device))
        summary = evaluate_clip(best, tokenizer, splits[cfg.data.test_split])
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        (out / "report.json").write_text(json.dumps(summary, indent=2))
        print(f"\nRetrieval, zero-shot classification and caption swaps on '{cfg.data.test_split}':")
        for name in ("retrieval", "zeroshot", "swaps"):
            if name in summary:
                print(f"\n{format_clip_report(summary[name])}")
        print(f"wall time {summary['wall_s']:.0f} s")
    elif report and rank == 0:
        best, _ = VLM.load(out / "best", device=str(trainer.device))
        test = splits[cfg.data.test_split]
        summary = {}
        if any(test.captions):
            summary = evaluate_split(best, tokenizer, test, limit=1000, questions=False)
        if cfg.train.stage == "instruct":
            summary["vqa"] = vqa_report(best, tokenizer, test, splits[cfg.data.train_split].qa or [], limit=1000)
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        (out / "report.json").write_text(json.dumps(summary, indent=2))
        seen = cfg.data.test_split == cfg.data.train_split  # a smoke run may train and report on one split
        print(format_report(summary, test, cfg.data.test_split, held_out=not seen))
    if dist.is_initialized():
        # Tear down while the interpreter is whole: once every rank is done, free the DDP wrapper (it holds the
        # process group) before destroying the group. Left to interpreter exit, gloo's threads can abort the
        # process (SIGABRT) after a run that succeeded.
        dist.barrier()
        del trainer
        gc.collect()
        dist.destroy_process_group()
    return out


def start_from(model: VLM, directory: str, tokenizer: Tokenizer | None = None) -> None:
    """Start from the weights of a saved captioner of the same shape, e.g. a decoder trained on text alone."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(
            f"--init-from {directory}: no such folder; train the run it names first (runs/scenes/best is the main "
            "job's: python -m nanovlm train)"
        )
    saved, saved_tokenizer = VLM.load(directory)
    if saved.cfg.fusion != model.cfg.fusion:
        raise ValueError(
            f"--init-from {directory}: it holds a model with {saved.cfg.fusion} fusion, this run builds one with "
            f"{model.cfg.fusion} fusion; give --fusion {saved.cfg.fusion}, or train the earlier stage with "
            f"--fusion {model.cfg.fusion}"
        )
    if saved.cfg != model.cfg:
        raise ValueError(f"--init-from {directory}: it holds a model of another configuration than this run's")
    if tokenizer is not None and saved_tokenizer.mergeable_ranks != tokenizer.mergeable_ranks:
        raise ValueError(
            f"--init-from {directory}: its tokenizer is not this dataset's; start from a run on the same data"
        )
    model.load_state_dict(saved.state_dict())


def start_vision_from(model: VLM, directory: str) -> None:
    """Stage 1 of the pipeline: copy a trained CLIP's ViT into the captioner (the rest stays as it is)."""
    if model.cfg.fusion == "early":
        raise ValueError(f"--init-vision {directory}: a model with early fusion has no ViT to start from a CLIP's")
    clip, _ = CLIP.load(directory)
    if clip.cfg.vit != model.cfg.vit:
        raise ValueError(
            f"--init-vision {directory}: its ViT is {clip.cfg.vit}, but this model's is {model.cfg.vit}; "
            "give the captioner the same --vit-* settings"
        )
    model.vit.load_state_dict(clip.vit.state_dict())


def say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def describe(cfg: RunConfig, model: VLM | CLIP, tokenizer: Tokenizer, splits: dict[str, PackedSplit]) -> str:
    n = sum(p.numel() for p in model.parameters())
    sizes = ", ".join(f"{name} {len(s)}" for name, s in splits.items())
    if isinstance(model, CLIP):
        shape = f"contrastive, {cfg.model.vit.n_patches} patches and {cfg.data.max_text_len} text tokens"
    else:
        shape = f"{cfg.model.n_image_tokens} image + {cfg.data.max_text_len} text tokens"
        if cfg.model.fusion == "cross":
            shape = f"{cfg.data.max_text_len} text tokens reading {cfg.model.cross.n_latents} image latents"
        shape = f"{cfg.model.fusion} fusion, {shape}"
    return (
        f"data {cfg.data.root} ({sizes} images, {cfg.data.image_size}px); tokenizer {tokenizer.vocab_size} tokens; "
        f"model {n / 1e6:.2f}M parameters, {shape}"
    )


# the main job's targets on held-out scenes: key, label, target, whether higher is better
TARGETS = [
    ("object_f1", "object F1 (size + colour + shape)", 0.95, True),
    ("chair_s", "captions naming an absent object", 0.05, False),
    ("count_acc", "count accuracy on repeated objects", 0.90, True),
    ("relation_acc", "spatial relation accuracy", 0.80, True),
]
# and those of instruction tuning on the scenes' questions (the captions keep the first two above)
VQA_TARGETS = [("vqa_acc", "VQA accuracy, all questions", 0.95, True)] + [
    (f"vqa_acc/{kind}", f"VQA accuracy, {kind} questions", 0.90, True)
    for kind in ("colour", "shape", "count", "existence", "relation")
]


def _targets(scores: dict, targets: list[tuple[str, str, float, bool]]) -> list[str]:
    """One line per target that applies: the value, the target, and whether it is met."""
    lines = []
    for key, label, target, higher in targets:
        if key in scores:
            value = scores[key]
            met = value >= target if higher else value <= target
            sign = ">=" if higher else "<="
            lines.append(f"  {label:<38} {value:6.3f}  (target {sign} {target}: {'met' if met else 'MISSED'})")
    return lines


def format_report(summary: dict, split: PackedSplit, split_name: str, samples: int = 8, held_out: bool = True) -> str:
    """Sample captions next to the truth, the targets met or missed, then every score vs the blind baseline.

    held_out=False says that the split is the one the model trained on, where the report's lines name it."""
    lines = []
    which = "held-out" if held_out else "training (not held out!)"
    if "captions" in summary:
        lines.append(f"\nCaptions for {which} '{split_name}' images (model, then the truth):")
        for i in range(min(samples, summary["n_images"])):
            lines.append(f"  {split.file_names[i]}  {summary['captions'][i]}")
            lines.append(f"  {' ' * len(split.file_names[i])}  {split.captions[i][0]}")
    if "vqa" in summary:
        vqa = summary["vqa"]
        lines.append(f"\n{vqa['n_questions']} questions about {which} '{split_name}' images:")
        lines.append(format_vqa_report(vqa))
    model = summary.get("model", {})
    if "object_f1" in model or "vqa" in summary:
        lines.append(f"\nTargets on {which} '{split_name}' images:")
        lines += _targets(model, TARGETS[:2] if "vqa" in summary else TARGETS)
    if "vqa" in summary:
        lines += _targets(summary["vqa"]["model"], VQA_TARGETS)
        lines += _targets(
            {"blind": summary["vqa"]["blind"]["vqa_acc"]}, [("blind", "blind model, all questions", 0.55, False)]
        )
    if model:
        humans = ", humans = each reference against the others" if "humans" in summary else ""
        lines.append(
            f"\nAll caption scores (blind = the same model shown a blank image{humans}):\n{score_table(summary)}"
        )
    lines.append(f"wall time {summary['wall_s']:.0f} s")
    return "\n".join(lines)


def _as_dict(cfg: RunConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
