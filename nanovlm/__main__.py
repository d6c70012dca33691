"""The command line: python -m nanovlm {train, caption, ask, eval, data, bench, grade} ... (each has --help)."""

import argparse
import json
import sys
from pathlib import Path

from . import config


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a preset (the main job: --preset scenes)",
        description="Train a VLM. Every field of the preset can be overridden, e.g. --max-steps 200 --vit-dim 64.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default="scenes", choices=sorted(config.PRESETS), help="named configuration")
    p.add_argument("--fresh", action="store_true", help="refuse to resume: fail if --out already holds a run")
    p.add_argument("--no-report", action="store_true", help="skip the captions and scores printed at the end")
    groups, seen = {}, set()
    for preset in ("scenes", "clip"):  # the captioner's settings, then those only a contrastive model has
        for flag, (obj, attr) in config.override_fields(config.get_preset(preset)).items():
            if flag in seen:
                continue
            seen.add(flag)
            kind = type(obj).__name__
            if kind not in groups:
                groups[kind] = p.add_argument_group(f"{kind} fields (defaults shown are the {preset} preset's)")
            value = getattr(obj, attr)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            groups[kind].add_argument(
                f"--{flag}",
                dest=f"set:{flag}",
                metavar=type(value).__name__.upper(),
                help=f"{config.field_help(obj, attr)} ({preset}: {shown})",
            )


def cmd_train(args) -> None:
    from .pipeline import run

    overrides = {k.removeprefix("set:"): v for k, v in vars(args).items() if k.startswith("set:") and v is not None}
    cfg = config.apply_overrides(config.get_preset(args.preset), overrides)
    run(cfg, fresh=args.fresh, report=not args.no_report)


def add_caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="caption image files with a trained model")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--ckpt", required=True, help="a saved model folder, e.g. runs/scenes/best")
    p.add_argument("--temperature", type=config.nonnegative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=config.positive_int, default=None)
    p.add_argument("--top-p", type=config.probability_above_zero, default=None)
    p.add_argument("--seed", type=config.random_seed, default=0, help="for sampling (temperature > 0)")
    p.add_argument("--device", type=config.device, default="cpu")


def cmd_caption(args) -> None:
    import numpy as np
    import torch

    from .data import load_image, resize_image, to_tensor
    from .vlm import VLM

    for path in args.images:
        if Path(path).is_dir():
            raise ValueError(f"{path} is a directory, not an image file; name the image files in it")
    pictures = [load_image(path) for path in args.images]  # a bad file fails before the model loads
    model, tok = VLM.load(args.ckpt, device=args.device)
    size = model.cfg.vit.image_size
    pixels = np.stack([resize_image(picture, size) for picture in pictures])  # (N, H, W, 3)
    images = to_tensor(pixels, args.device)
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
    p.add_argument(
        "--task",
        choices=("captions", "vqa", "retrieval", "zeroshot", "swaps"),
        default="captions",
        help="captions: a captioner's captions and answers; vqa: an instruction-tuned model's answers, by the "
        "official VQA accuracy, against blind and answer-prior baselines; for a CLIP checkpoint: retrieval "
        "(recall@K), zeroshot (colour/shape/size of one-object scenes), swaps (true caption vs colours or relation "
        "swapped)",
    )
    p.add_argument("--data", default="data/scenes", help="dataset root (scenes or COCO layout)")
    p.add_argument("--split", default="val", help="split name, e.g. val, test, novel, val2017")
    p.add_argument("--train-split", default="train", help="vqa: the split whose answers make the answer prior")
    p.add_argument("--limit", type=config.positive_int, default=None, help="score only the first N images")
    p.add_argument("--no-blind", action="store_true", help="skip the blind (no image) baseline")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--sheet",
        default=None,
        help="write a PNG here: captions: the first 16 images with their captions; retrieval: the image-caption "
        "similarity matrix of the first 8 images",
    )
    p.add_argument("--device", type=config.device, default="cpu")
    p.add_argument(
        "--query",
        default=None,
        metavar="TEXT",
        help="retrieval with --sheet PATH: also draw the images nearest to TEXT, in PATH's folder as NAME_query.png",
    )


def cmd_eval(args) -> None:
    from .data import PackedSplit, prepare
    from .evaluate import evaluate_split, json_summary, score_table
    from .vlm import VLM

    if args.query is not None and (args.task != "retrieval" or not args.sheet):
        raise ValueError("--query needs --task retrieval and --sheet PATH: its picture is written next to PATH")
    if args.task == "vqa":
        return _eval_vqa(args)
    if args.task != "captions":
        from .clip import CLIP
        from .clip_eval import TASKS, format_clip_report
        from .viz import retrieve_sheet, similarity_sheet

        if args.sheet and args.task != "retrieval":
            raise ValueError(f"--sheet draws for --task captions or retrieval; --task {args.task} has no sheet")
        try:
            model, tok = CLIP.load(args.ckpt, device=args.device)
        except ValueError as e:
            raise ValueError(f"eval --task {args.task} needs a CLIP checkpoint: {e}") from e
        split = PackedSplit(prepare(args.data, args.split, model.cfg.vit.image_size))  # notes go to stderr
        summary = TASKS[args.task](model, tok, split, limit=args.limit)
        if args.sheet:
            similarity_sheet(model, tok, split, path=args.sheet)
        if args.query is not None:
            sheet = Path(args.sheet)
            nearest = sheet.with_name(f"{sheet.stem}_query{sheet.suffix or '.png'}")
            retrieve_sheet(model, tok, split, args.query, path=nearest, limit=args.limit)
        if args.json:
            print(json.dumps(json_summary(summary), indent=2, allow_nan=False))
        else:
            n = min(args.limit or len(split), len(split))
            print(f"CLIP {args.task} on the first {n} '{args.split}' images of {args.data}")
            print(format_clip_report(summary))
        return
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


def _eval_vqa(args) -> None:
    from .data import PackedSplit, prepare, read_questions
    from .evaluate import format_vqa_report, json_summary, vqa_report
    from .vlm import VLM

    if args.sheet or args.query is not None or args.no_blind:
        raise ValueError("--task vqa takes no --sheet, --query or --no-blind: it always reports the blind baseline")
    model, tok = VLM.load(args.ckpt, device=args.device)
    split = PackedSplit(prepare(args.data, args.split, model.cfg.vit.image_size))  # notes go to stderr
    train_qa, _ = read_questions(Path(args.data), args.train_split)
    if not train_qa:
        raise ValueError(
            f"{args.data} has no questions for --train-split {args.train_split!r}, whose answers make the answer prior"
        )
    report = vqa_report(model, tok, split, train_qa, limit=args.limit)
    if args.json:
        print(json.dumps(json_summary(report), indent=2, allow_nan=False))
    else:
        print(
            f"VQA on {report['n_questions']} questions of '{args.split}' in {args.data} "
            f"(blind: blank images; prior: the commonest '{args.train_split}' answer per question type)"
        )
        print(format_vqa_report(report))


def add_data_parser(sub) -> None:
    p = sub.add_parser("data", help="make the scenes dataset, fetch and prepare COCO, or prepare VQA v2 data")
    p.add_argument("kind", choices=["scenes", "coco", "vqa"])
    p.add_argument("--root", default=None, help="dataset folder (default data/scenes, data/coco or data/vqa)")
    p.add_argument("--splits", default=None, help="vqa: splits to prepare, e.g. train2014,val2014 (default: all)")
    p.add_argument(
        "--image-size", type=config.positive_int, default=None, help="pack images at this size (default: the preset's)"
    )
    p.add_argument("--n-train", type=config.positive_int, default=None, help="scenes: number of training images")
    p.add_argument("--parts", default="val2017,annotations", help="coco: zips to fetch (train2017,val2017,annotations)")
    p.add_argument("--no-download", action="store_true", help="coco: only prepare what is already unzipped")
    p.add_argument(
        "--laptop",
        action="store_true",
        help="coco: cut val2017 into the laptop split (4,000 / 500 / 500 photos) that `--preset coco-laptop` trains on",
    )


def cmd_data(args) -> None:
    from .pipeline import prepare_splits

    if args.kind == "vqa":
        return _data_vqa(args)
    if args.laptop and args.kind != "coco":
        raise ValueError(f"--laptop cuts COCO's val2017; it does nothing for {args.kind}")
    cfg = config.get_preset({"scenes": "scenes", "coco": "coco-laptop" if args.laptop else "coco"}[args.kind]).data
    if args.root is not None and not args.root.strip():
        raise ValueError("--root '': name the dataset folder")
    cfg.root = args.root or cfg.root
    cfg.image_size = args.image_size or cfg.image_size
    cfg.n_train = args.n_train or cfg.n_train
    if args.kind == "scenes" and cfg.image_size < 16:
        raise ValueError(f"--image-size {cfg.image_size}: scenes are drawn at 16 px or more")
    if args.kind == "coco":
        from .coco import ARCHIVES, fetch

        parts = tuple(p for p in args.parts.split(",") if p)
        unknown = sorted(set(parts) - set(ARCHIVES))
        if unknown or not parts:
            raise ValueError(f"--parts {args.parts!r}: choose from {','.join(ARCHIVES)}")
        if not args.no_download:
            fetch(cfg.root, parts=parts)
        if args.laptop:
            from .coco import make_laptop_split

            for name, n in make_laptop_split(cfg.root).items():
                print(f"{name}: {n} photos of val2017 (ids in {Path(cfg.root) / 'annotations' / 'laptop_split.json'})")
        else:  # with one image folder only (val2017), every split is packed from it
            present = [s for s in ("train2017", "val2017") if (Path(cfg.root) / s).is_dir()] or ["val2017"]
            cfg.train_split = "train2017" if "train2017" in present else present[0]
            cfg.val_split = cfg.test_split = "val2017" if "val2017" in present else present[0]
    for name, split in prepare_splits(cfg).items():
        print(f"{name}: {len(split)} images of {split.image_size}px in {split.dir}")


def _data_vqa(args) -> None:
    """Check and pack every split of a VQA v2 folder: one line per split with what it holds and skipped."""
    from .data import PackedSplit, prepare
    from .vqa import split_files

    root = Path(args.root or config.get_preset("vqa").data.root)
    image_size = args.image_size or config.get_preset("vqa").data.image_size
    if args.splits:
        splits = [s for s in args.splits.split(",") if s]
    else:  # every image folder with a questions file
        folders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        splits = [s for s in folders if s not in ("annotations", "prepared") and split_files(root, s)]
    if not splits:
        raise FileNotFoundError(
            f"{root} has no split with a questions file (annotations/*SPLIT_questions.json beside a folder SPLIT/ "
            "of images); see data/README.md"
        )
    for name in splits:
        if split_files(root, name) is None:
            raise FileNotFoundError(f"{root / 'annotations'} has no {name}_questions.json (--splits {args.splits})")
        packed = PackedSplit(prepare(root, name, image_size))
        manifest = json.loads((packed.dir / "manifest.json").read_text(encoding="utf-8"))
        skipped = manifest["result"].get("skipped_questions", [])
        answered = sum(q["answer"] is not None for q in packed.qa or [])
        print(
            f"{name}: {len(packed)} images of {packed.image_size}px, {len(packed.qa or [])} questions "
            f"({answered} with answers), {len(skipped)} skipped (listed in {packed.dir / 'manifest.json'})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanovlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench, chat, grading

    parsers = (
        add_train_parser,
        add_caption_parser,
        add_eval_parser,
        add_data_parser,
        chat.add_parser,
        bench.add_parser,
        grading.add_parser,
    )
    for add in parsers:
        add(sub)
    args = parser.parse_args(argv)
    commands = {
        "train": cmd_train,
        "caption": cmd_caption,
        "eval": cmd_eval,
        "data": cmd_data,
        "ask": chat.run,
        "bench": bench.run,
        "grade": grading.run,
    }
    try:
        commands[args.command](args)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:  # OSError: missing files, a full disk
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        again = "; run the same command again to go on from the last checkpoint" if args.command == "train" else ""
        print(f"\ninterrupted{again}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
