"""The command line: python -m nanovlm {train, caption, eval, data} ... (each has --help)."""

import argparse
import inspect
import json
import re
import sys
from pathlib import Path

from . import presets


def field_help(obj) -> dict[str, str]:
    """The comment after each field of a config dataclass: one source of truth for --help."""
    source = inspect.getsource(type(obj))
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.M))


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a preset (the main job: --preset scenes)",
        description="Train a VLM. Every field of the preset can be overridden, e.g. --max-steps 200 --vit-dim 64.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="scenes", choices=sorted(presets.PRESETS), help="named configuration")
    p.add_argument("--fresh", action="store_true", help="refuse to resume: fail if --out already holds a run")
    p.add_argument("--no-report", action="store_true", help="skip the captions and scores printed at the end")
    defaults = presets.get_preset("scenes")
    groups = {}
    for flag, (obj, attr) in presets.override_fields(defaults).items():
        kind = type(obj).__name__
        group = groups.setdefault(kind, p.add_argument_group(f"{kind} fields (defaults shown are the scenes preset's)"))
        value = getattr(obj, attr)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        group.add_argument(
            f"--{flag}",
            dest=f"set:{flag}",
            metavar=type(value).__name__.upper(),
            help=f"{field_help(obj).get(attr, '')} (scenes: {shown})",
        )


def cmd_train(args) -> None:
    from .pipeline import run

    overrides = {k.removeprefix("set:"): v for k, v in vars(args).items() if k.startswith("set:") and v is not None}
    cfg = presets.apply_overrides(presets.get_preset(args.preset), overrides)
    run(cfg, fresh=args.fresh, report=not args.no_report)


def add_caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="caption image files with a trained model")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--ckpt", required=True, help="a saved model folder, e.g. runs/scenes/best")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="for sampling (temperature > 0)")
    p.add_argument("--device", default="cpu")


def cmd_caption(args) -> None:
    import numpy as np
    import torch

    from .data import load_image, resize_image
    from .vlm import VLM

    model, tok = VLM.load(args.ckpt, device=args.device)
    size = model.cfg.vit.image_size
    pixels = np.stack([resize_image(load_image(path), size) for path in args.images])  # (N, H, W, 3)
    images = torch.from_numpy(pixels).to(args.device).permute(0, 3, 1, 2).float().div(255.0)
    prompt = torch.full((len(args.images), 1), tok.image, dtype=torch.long, device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(
        images,
        prompt,
        model.cfg.max_text_len - 1,
        eot=tok.eot,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=gen,
    )
    for path, ids in zip(args.images, out, strict=True):
        print(f"{path}: {tok.decode(ids).strip()}")


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a trained model on a prepared split")
    p.add_argument("--ckpt", required=True, help="a saved model folder, e.g. runs/scenes/best")
    p.add_argument("--data", default="data/scenes", help="dataset root (scenes or COCO layout)")
    p.add_argument("--split", default="val", help="split name, e.g. val, test, novel, val2017")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument("--no-blind", action="store_true", help="skip the blind (no image) baseline")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--sheet", default=None, help="write a PNG of the first 16 images with their captions here")
    p.add_argument("--device", default="cpu")


def cmd_eval(args) -> None:
    from .data import PackedSplit, prepare
    from .evaluate import evaluate_split, json_summary, score_table
    from .vlm import VLM

    model, tok = VLM.load(args.ckpt, device=args.device)
    split = PackedSplit(prepare(args.data, args.split, model.cfg.vit.image_size))  # notes go to stderr
    summary = evaluate_split(model, tok, split, limit=args.limit, blind_baseline=not args.no_blind)
    if args.sheet:
        from .viz import caption_sheet

        n = summary["n_images"]
        references = [refs[0] for refs in split.captions[:n]]
        caption_sheet(split.images[:n], summary["captions"], references, path=args.sheet)
    if args.json:
        print(json.dumps(json_summary(summary), indent=2, allow_nan=False))
    else:
        print(f"Scores on {summary['n_images']} '{args.split}' images of {args.data} (nan: nothing to measure)")
        print(score_table(summary))


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="make the scenes dataset or fetch and prepare COCO")
    p.add_argument("kind", choices=["scenes", "coco"])
    p.add_argument("--root", default=None, help="dataset folder (default data/scenes or data/coco)")
    p.add_argument("--image-size", type=int, default=None, help="pack images at this size (default: the preset's)")
    p.add_argument("--n-train", type=int, default=None, help="scenes: number of training images")
    p.add_argument("--parts", default="val2017,annotations", help="coco: zips to fetch (train2017,val2017,annotations)")
    p.add_argument("--no-download", action="store_true", help="coco: only prepare what is already unzipped")


def cmd_data(args) -> None:
    from .pipeline import prepare_splits

    cfg = presets.get_preset("scenes" if args.kind == "scenes" else "coco").data
    cfg.root = args.root or cfg.root
    cfg.image_size = args.image_size or cfg.image_size
    cfg.n_train = args.n_train or cfg.n_train
    if args.kind == "coco":
        from .coco import fetch

        if not args.no_download:
            fetch(cfg.root, parts=tuple(p for p in args.parts.split(",") if p))
        present = [s for s in ("train2017", "val2017") if (Path(cfg.root) / s).is_dir()]
        cfg.train_split = cfg.val_split = cfg.test_split = present[0] if present else "val2017"
        if "train2017" in present:
            cfg.train_split = "train2017"
    for name, split in prepare_splits(cfg).items():
        print(f"{name}: {len(split)} images of {split.image_size}px in {split.dir}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanovlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, grade

    parsers = (
        add_train_parser,
        add_caption_parser,
        add_eval_parser,
        add_data_parser,
        bench.add_parser,
        grade.add_parser,
    )
    for add in parsers:
        add(sub)
    args = parser.parse_args(argv)
    commands = {
        "train": cmd_train,
        "caption": cmd_caption,
        "eval": cmd_eval,
        "data": cmd_data,
        "bench": bench.run,
        "grade": grade.run,
    }
    try:
        commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is saved: run the same command again to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
