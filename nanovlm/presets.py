"""Named configurations of a whole run: data, model and training, each field overridable from the CLI.

A preset says what it costs and what it reaches as measured; a figure that no command has printed yet is
marked as not measured.
"""

import copy
from dataclasses import dataclass, field, fields, is_dataclass

from .decoder import DecoderConfig
from .projector import ProjectorConfig
from .trainer import TrainConfig
from .vit import ViTConfig
from .vlm import VLMConfig


@dataclass
class DataConfig:
    kind: str = "scenes"  # "scenes" (generated here, no download) or "coco" (the official 2017 layout)
    root: str = "data/scenes"  # folder with annotations/ and the image folders
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"  # held-out split the final report is computed on
    image_size: int = 64  # images are packed at image_size x image_size
    vocab_size: int = 512  # BPE vocabulary trained on the training captions
    max_text_len: int = 40  # text tokens per sample (prompt + caption + end), longer ones are cut
    n_train: int = 40000  # scenes only: generated training images

    def __post_init__(self) -> None:
        if self.kind not in ("scenes", "coco"):
            raise ValueError(f"data kind {self.kind!r} is unknown; use scenes or coco")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: VLMConfig = field(default_factory=VLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def finalize(self) -> "RunConfig":
        """Make the dependent fields agree: image size, widths and sequence length."""
        m, d = self.model, self.data
        m.vit.image_size = d.image_size
        m.projector.in_dim, m.projector.out_dim = m.vit.dim, m.decoder.dim
        m.decoder.max_seq_len = m.n_image_tokens + d.max_text_len
        m.vit.__post_init__()
        m.__post_init__()
        return self


def _scenes() -> RunConfig:
    # The main job: `python -m nanovlm train --preset scenes` on a 2-core CPU; what it costs and reaches is
    # in the README, copied from its own output. 4x4 patches (256 of them, merged 4x4 by pixel shuffle into
    # 16 image tokens) taught shapes several times faster than 8x8 patches at the same cost; the canonical
    # caption (first_caption_prob=1) gives the decoder one fixed way to say what it sees, with the place of
    # each one-of-a-kind object written before the relation sentence (52 text tokens hold the longest such
    # caption). Muon for the weight matrices is what made a few minutes enough: in 1,700 steps AdamW reached
    # object F1 0.63-0.67 over three seeds, Muon 0.97-0.98. With 20,000 training scenes the model learnt
    # them by heart in the last third of the run (train loss 0.012 against validation 0.028 at step 1,500);
    # 60,000 cut the validation loss at step 1,600 by a quarter to a third, and 40,000 costs 20 s less to
    # draw. A one-head ViT, no biases and Muon's stacked update made a step about 12 % cheaper, so 1,600
    # steps fit in ten minutes (README). Two ViT layers and four decoder layers beat three and three at the
    # same cost per step with two threads.
    return RunConfig(
        data=DataConfig(
            kind="scenes", root="data/scenes", image_size=64, vocab_size=512, max_text_len=52, n_train=40000
        ),
        model=VLMConfig(
            vit=ViTConfig(patch_size=4, dim=64, n_layers=2, n_heads=1),
            projector=ProjectorConfig(in_dim=64, out_dim=128, pixel_shuffle=4),
            decoder=DecoderConfig(dim=128, n_layers=4, n_heads=4),
        ),
        train=TrainConfig(
            max_steps=1600,
            batch_size=64,
            lr=5e-3,
            min_lr=1e-4,
            warmup_steps=50,
            first_caption_prob=1.0,
            optimizer="muon",
            out="runs/scenes",
        ),
    )


def _tiny() -> RunConfig:
    # The benchmark configuration of issue 7: 64x64 images, 8x8 patches -> 64 patches, pixel shuffle 2 ->
    # 16 image tokens, width 128, 4 + 4 layers, 4 heads, vocabulary 2048, 32 text tokens, batch 64.
    return RunConfig(
        data=DataConfig(kind="scenes", root="data/scenes", image_size=64, vocab_size=2048, max_text_len=32),
        model=VLMConfig(
            vit=ViTConfig(patch_size=8, dim=128, n_layers=4, n_heads=4),
            projector=ProjectorConfig(pixel_shuffle=2),
            decoder=DecoderConfig(dim=128, n_layers=4, n_heads=4, vocab_size=2048),
        ),
        train=TrainConfig(max_steps=500, batch_size=64, out="runs/tiny"),
    )


def _coco() -> RunConfig:
    # One GPU, COCO 2017 train at 224 px with bf16 and torch.compile. Not measured yet: no GPU run of this
    # preset has been made, so its cost and its BLEU/CIDEr are unknown.
    return RunConfig(
        data=DataConfig(
            kind="coco",
            root="data/coco",
            train_split="train2017",
            val_split="val2017",
            test_split="val2017",
            image_size=224,
            vocab_size=8192,
            max_text_len=48,
        ),
        model=VLMConfig(
            vit=ViTConfig(patch_size=16, dim=384, n_layers=8, n_heads=6),
            projector=ProjectorConfig(in_dim=384, out_dim=512, pixel_shuffle=2),
            decoder=DecoderConfig(dim=512, n_layers=8, n_heads=8),
        ),
        train=TrainConfig(
            max_steps=20000, batch_size=128, lr=6e-4, min_lr=6e-5, warmup_steps=500, eval_every=1000, out="runs/coco"
        ),
    )


PRESETS = {"scenes": _scenes, "tiny": _tiny, "coco": _coco}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]().finalize()


def override_fields(run: RunConfig) -> dict[str, tuple[object, str]]:
    """Every overridable field as 'flag-name' -> (config object, attribute), e.g. 'vit-dim' -> (vit, 'dim').

    Training fields keep their plain names (--max-steps), data fields too (--image-size) with --data for
    the root; model fields are prefixed with their component (--vit-n-layers, --decoder-dim).
    """
    out = {}
    for obj, prefix in (
        (run.train, ""),
        (run.data, ""),
        (run.model.vit, "vit-"),
        (run.model.projector, "projector-"),
        (run.model.decoder, "decoder-"),
    ):
        for f in fields(obj):
            if is_dataclass(getattr(obj, f.name)):
                continue
            name = "data" if obj is run.data and f.name == "root" else prefix + f.name.replace("_", "-")
            out[name] = (obj, f.name)
    return out


def apply_overrides(run: RunConfig, values: dict[str, str]) -> RunConfig:
    """Set fields from strings given on the command line, converting to each field's type."""
    run = copy.deepcopy(run)
    table = override_fields(run)
    for name, text in values.items():
        if name not in table:
            raise ValueError(f"--{name} is not a setting; see --help for the list")
        obj, attr = table[name]
        setattr(obj, attr, _convert(text, getattr(obj, attr), name))
    for obj in (run.train, run.data, run.model.vit, run.model.decoder):
        obj.__post_init__()  # re-check the values now that they changed
    return run.finalize()


def _convert(text: str, current: object, name: str) -> object:
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return text.lower() in ("true", "1", "yes", "on")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            items = [t for t in text.split(",") if t]
            return tuple(type(current[0])(t) for t in items) if current else tuple(items)
        return text
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected a {type(current).__name__}") from None
