"""The configuration of a run, in one place: data, training, the named presets and the command-line overrides.

Nothing here trains. The model's own settings are the component configs (ViTConfig, ProjectorConfig,
DecoderConfig), each in its component's file so that the file copies alone. `RunConfig.finalize` is the one
place that sets the fields derived from others (image size, widths, sequence length, vocabulary). A flag's
--help line is its field's metadata (`setting`), or `COMPONENT_HELP` for a component's field. What each
preset costs and reaches is in the README, next to the command that printed it.

Values from the command line are checked before any work starts: `apply_overrides` for the train settings,
the argparse types at the end of this file for the other commands' flags. A bad one stops the command
with one line that names its flag.
"""

import argparse
import copy
import math
import re
import shlex
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch

from .clip import CLIPConfig
from .cross_attention import CrossAttentionConfig
from .decoder import DecoderConfig
from .projector import ProjectorConfig
from .tokenizer import SPECIAL_TOKENS
from .vit import ViTConfig
from .vlm import FUSIONS, VLMConfig


def setting(default: Any, help: str) -> Any:
    """A config field with the line that `--help` shows for its flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    kind: str = setting(
        "scenes", '"scenes" (generated here, no download), "coco" (the official 2017 layout) or "vqa" (VQA v2 layout)'
    )
    root: str = setting("data/scenes", "folder with annotations/ and the image folders")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = setting("test", "held-out split the final report is computed on")
    image_size: int = setting(64, "images are packed at image_size x image_size")
    vocab_size: int = setting(512, "BPE vocabulary trained on the training captions")
    max_text_len: int = setting(40, "text tokens per sample (prompt + caption + end), longer ones are cut")
    n_train: int = setting(40000, "scenes only: generated training images")

    def __post_init__(self) -> None:
        if self.kind not in ("scenes", "coco", "vqa"):
            raise ValueError(f"data kind {self.kind!r} is unknown; use scenes, coco or vqa")
        for name in ("root", "train_split", "val_split", "test_split"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty; it names a folder of the dataset")
        for name in ("image_size", "vocab_size", "n_train"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_text_len < 2:
            raise ValueError(f"max_text_len must be at least 2 (the prompt and the end token), got {self.max_text_len}")


# stage -> (data task, components that train); everything else is frozen. "clip" trains a contrastive model
# (clip.CLIP), the others a captioner (vlm.VLM), which has the components of its fusion only (VLMConfig.parts):
# "align" trains the bridge between a frozen vision side and a frozen decoder, whichever the fusion has.
STAGES = {
    "clip": ("contrastive", ("vit", "text", "image_proj", "text_proj", "logit_scale")),
    "text": ("text", ("decoder",)),
    "align": ("caption", ("projector", "resampler", "xattn")),
    "full": ("caption", ("vit", "projector", "resampler", "xattn", "decoder")),
    "instruct": ("chat", ("vit", "projector", "resampler", "xattn", "decoder")),
}
COMPONENTS = {"vit", "projector", "resampler", "xattn", "decoder", "text", "image_proj", "text_proj", "logit_scale"}


@dataclass
class TrainConfig:
    stage: str = setting("full", "one of STAGES")
    max_steps: int = setting(1000, "optimizer steps in this stage")
    batch_size: int = setting(64, "samples per micro-batch, summed over all processes")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(1e-3, "peak learning rate")
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = setting(50, "linear warmup from 0 to lr")
    weight_decay: float = setting(0.1, "applied to weight matrices and embeddings only")
    optimizer: str = setting("adamw", '"adamw", or "muon": Muon for the blocks\' weight matrices, AdamW for the rest')
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = setting(250, "steps between evaluations (and checkpoints)")
    eval_batches: int = setting(8, "held-out batches per evaluation")
    log_every: int = setting(10, "steps between log lines")
    seed: int = 0
    device: str = setting("auto", '"auto" (cuda if available), "cpu", "cuda", "cuda:1", ...')
    dtype: str = setting("auto", '"auto" (bf16 on CUDA, fp32 on CPU), "fp32" or "bf16"')
    compile: str = setting("auto", '"auto" (on for CUDA, off on CPU), "on" or "off"')
    train: tuple[str, ...] = setting((), "components to train; empty = the stage's default")
    init_from: str = setting("", "a saved captioner folder whose weights this run starts from (e.g. the text stage's)")
    init_vision: str = setting("", "a CLIP checkpoint folder whose ViT the captioner starts from; empty = random")
    first_caption_prob: float = setting(0.0, "chance of the dataset's first (canonical) caption; 0 = uniform")
    caption_prob: float = setting(0.5, "instruct stage: share of images shown with a caption, the rest with a chat")
    text_pairs: bool = setting(
        False, "text stage: each caption follows another of its image, so the decoder learns to read what precedes it"
    )
    text_grid: bool = setting(
        False,
        "text stage: the decoder captions from a map of each image's objects as words, laid out like the image tokens",
    )
    out: str = setting("runs/scenes", "where checkpoints and logs go")

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {sorted(STAGES)}")
        unknown = set(self.train) - COMPONENTS
        if unknown:
            raise ValueError(f"train names unknown components {sorted(unknown)}; use {', '.join(sorted(COMPONENTS))}")
        if self.text_pairs and self.stage != "text":
            raise ValueError(f"text_pairs shapes the text stage's samples; stage {self.stage!r} has none")
        if self.text_grid and self.stage != "text":
            raise ValueError(f"text_grid shapes the text stage's samples; stage {self.stage!r} has none")
        if self.text_grid and self.text_pairs:
            raise ValueError("text_grid and text_pairs are two ways to shape the text stage's samples; choose one")
        if (self.init_vision or self.init_from) and self.stage == "clip":
            raise ValueError("init_vision and init_from start a captioner; stage clip trains a contrastive model")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adamw or muon")
        if not 0 < self.lr < math.inf:  # nan fails every comparison, so it is rejected too
            raise ValueError(f"lr must be a finite number above 0, got {self.lr}")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1) such as 0.9,0.98; got {self.betas}")
        for name in ("first_caption_prob", "caption_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.seed < 2**64:  # the range torch.manual_seed takes
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        for name, known in (("dtype", ("auto", "fp32", "bf16")), ("compile", ("auto", "on", "off"))):
            if getattr(self, name) not in known:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(known)}")
        try:
            device_type = "cpu" if self.device == "auto" else torch.device(self.device).type
        except RuntimeError:  # torch's own message lists device types this trainer cannot use
            device_type = None
        if device_type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {self.device!r} is not one this trainer runs on; use auto, cpu, cuda or cuda:N")
        if not self.out:
            raise ValueError("out is empty; name the folder for checkpoints and logs")

    @property
    def task(self) -> str:
        return STAGES[self.stage][0]

    @property
    def trained_components(self) -> tuple[str, ...]:
        return tuple(self.train) or STAGES[self.stage][1]


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: VLMConfig | CLIPConfig = field(default_factory=VLMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def finalize(self, vocab_size: int | None = None) -> "RunConfig":
        """Set every field that follows from others, then check every field; returns self.

        The ViT's image size is the data's, the projector's widths are the ViT's and the decoder's, the decoder's
        max_seq_len holds the image tokens and max_text_len, and its vocab_size is the tokenizer's (given as
        vocab_size; left as it is when None, before the tokenizer exists).
        """
        m, d = self.model, self.data
        if (self.train.stage == "clip") != isinstance(m, CLIPConfig):
            wanted = "a contrastive model (--preset clip)" if self.train.stage == "clip" else "a captioner"
            raise ValueError(f"stage {self.train.stage!r} trains {wanted}, not a {type(m).__name__}")
        if isinstance(m, CLIPConfig):
            return self._finalize_clip(vocab_size)
        m.vit.image_size = d.image_size
        m.projector.in_dim = m.patch_values if m.fusion == "early" else m.vit.dim
        m.projector.out_dim = m.decoder.dim
        m.cross.vision_dim, m.cross.dim = m.vit.dim * m.cross.pixel_shuffle**2, m.decoder.dim
        if vocab_size is not None:
            m.decoder.vocab_size = vocab_size
        for cfg in (self.train, d, m.vit, m.projector, m.decoder, m.cross):
            cfg.__post_init__()  # first, so that the sizes below never divide by zero
        if m.fusion not in FUSIONS:
            raise ValueError(f"fusion {m.fusion!r} is unknown; choose one of {', '.join(FUSIONS)}")
        if absent := [c for c in self.train.train if c not in m.parts]:
            raise ValueError(
                f"train names {', '.join(absent)}, which a model with {m.fusion} fusion does not have; "
                f"it has {', '.join(m.parts)}"
            )
        side = m.vit.image_size // m.vit.patch_size  # patches along each side of the image
        merge = m.cross.pixel_shuffle if m.fusion == "cross" else m.projector.pixel_shuffle
        if side % merge:
            raise ValueError(
                f"pixel_shuffle {merge} does not divide the patch grid: image_size "
                f"{m.vit.image_size} / patch_size {m.vit.patch_size} = {side} patches a side"
            )
        m.decoder.max_seq_len = m.n_image_tokens + d.max_text_len
        m.__post_init__()
        return self

    def _finalize_clip(self, vocab_size: int | None) -> "RunConfig":
        """finalize() for a contrastive model: its ViT reads the data's images, its text encoder the captions."""
        m, d = self.model, self.data
        m.vit.image_size = d.image_size
        m.text.max_seq_len = d.max_text_len
        if vocab_size is not None:
            m.text.vocab_size = vocab_size
        m.eot_id = m.text.vocab_size - len(SPECIAL_TOKENS)  # <|endoftext|> is the first id after the BPE ranks
        for cfg in (self.train, d, m.vit, m.text):
            cfg.__post_init__()
        m.__post_init__()
        return self


def _scenes() -> RunConfig:
    # The main job (`python -m nanovlm train --preset scenes`), sized for a 2-core CPU. Small patches merged by
    # pixel shuffle teach shapes faster than large ones at the same cost; the canonical caption
    # (first_caption_prob=1) gives the decoder one fixed way to say what it sees (52 text tokens hold the longest);
    # Muon for the weight matrices is what makes a short run enough. The runs behind each choice are in
    # docs/experiments.md.
    return RunConfig(
        data=DataConfig(
            kind="scenes", root="data/scenes", image_size=64, vocab_size=512, max_text_len=52, n_train=40000
        ),
        model=VLMConfig(
            vit=ViTConfig(patch_size=4, dim=64, n_layers=2, n_heads=1),
            projector=ProjectorConfig(in_dim=64, out_dim=128, pixel_shuffle=4),
            decoder=DecoderConfig(dim=128, n_layers=4, n_heads=4),
            # --fusion cross: a gated layer before blocks 0 and 2; the resampler reads the same 16 merged squares
            # the projector does, and each latent starts from one of them
            cross=CrossAttentionConfig(every=2, pixel_shuffle=4, region_latents=True),
        ),
        train=TrainConfig(
            max_steps=1600,
            batch_size=64,
            lr=5e-3,
            min_lr=1e-4,
            warmup_steps=50,
            first_caption_prob=1.0,
            optimizer="muon",
            # On a GPU a step of a model this small is far from the arithmetic limit, and there the compile and
            # bf16 autocast made the run slower, so the main job trains the CPU's way everywhere.
            dtype="fp32",
            compile="off",
            out="runs/scenes",
        ),
    )


def _clip() -> RunConfig:
    # Stage 1: a contrastive image and text encoder on the scenes' canonical captions. Its ViT is the scenes
    # preset's, so that `--init-vision runs/clip/best` can start the captioner from it; a contrastive loss
    # learns more from a larger batch (more negatives per positive).
    scenes = _scenes()
    return RunConfig(
        data=scenes.data,
        model=CLIPConfig(
            vit=scenes.model.vit,
            text=DecoderConfig(dim=64, n_layers=2, n_heads=2),
            embed_dim=64,
        ),
        train=TrainConfig(
            stage="clip",
            max_steps=400,
            batch_size=256,
            lr=1e-3,
            min_lr=1e-4,
            warmup_steps=30,
            weight_decay=0.1,
            eval_every=100,
            eval_batches=4,
            first_caption_prob=1.0,
            optimizer="adamw",
            out="runs/clip",
        ),
    )


def _instruct() -> RunConfig:
    # Instruction tuning from the main job's captioner: every image is shown with its canonical caption or
    # with a chat of its questions, so that the model learns to answer and keeps captioning. The runs behind
    # the settings are in docs/experiments.md.
    run = _scenes()
    run.train = TrainConfig(
        stage="instruct",
        # the ViT and projector stay as the captioner left them: a step without their backward pass is cheaper,
        # so more steps fit, and the frozen image tokens keep the captions
        train=("decoder",),
        max_steps=900,
        batch_size=64,
        lr=5e-3,
        min_lr=1e-4,
        warmup_steps=20,
        eval_every=200,
        caption_prob=0.25,
        first_caption_prob=1.0,
        optimizer="muon",
        init_from="runs/scenes/best",
        out="runs/instruct",
    )
    return run


def _vqa() -> RunConfig:
    # Your own questions in the VQA v2 layout (data/README.md), on the scenes-sized model: at 64 px it trains on
    # a laptop; a real VQA v2 run wants the coco preset's model and a GPU (--image-size 224 --vit-dim 384 ...).
    run = _instruct()
    run.data = DataConfig(
        kind="vqa",
        root="data/vqa",
        train_split="train2014",
        val_split="val2014",
        test_split="val2014",
        image_size=64,
        vocab_size=2048,
        max_text_len=52,
    )
    run.train.init_from = ""
    run.train.train = ()  # from fresh weights every component has to learn
    run.train.out = "runs/vqa"
    return run


def _tiny() -> RunConfig:
    # What `python -m nanovlm bench` times by default: shaped like a real run, small enough for a CPU.
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
    # One GPU: COCO 2017 train at 224 px, with bf16 and torch.compile.
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


def _coco_laptop() -> RunConfig:
    # COCO on a laptop: val2017 alone (1 GB), cut into 4,000 / 500 / 500 photos by `data coco --laptop`, packed
    # at 64 px; the scenes preset's model with COCO's larger vocabulary and shorter captions. Its step count is
    # what `bench train --preset coco-laptop` says fits in 30 minutes on a 2-core CPU with the data's packing
    # and the report (README, Performance).
    return RunConfig(
        data=DataConfig(
            kind="coco",
            root="data/coco",
            train_split="laptop-train",
            val_split="laptop-val",
            test_split="laptop-test",
            image_size=64,
            vocab_size=2048,
            max_text_len=24,
        ),
        model=VLMConfig(
            vit=ViTConfig(patch_size=4, dim=64, n_layers=2, n_heads=1),
            projector=ProjectorConfig(in_dim=64, out_dim=128, pixel_shuffle=4),
            decoder=DecoderConfig(dim=128, n_layers=4, n_heads=4),
        ),
        train=TrainConfig(
            max_steps=6000,
            batch_size=64,
            lr=5e-3,
            min_lr=1e-4,
            warmup_steps=50,
            eval_every=500,
            optimizer="muon",
            out="runs/coco-laptop",
        ),
    )


PRESETS = {
    "scenes": _scenes,
    "clip": _clip,
    "instruct": _instruct,
    "vqa": _vqa,
    "tiny": _tiny,
    "coco": _coco,
    "coco-laptop": _coco_laptop,
}


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
    m = run.model
    if isinstance(m, CLIPConfig):
        components = ((m.vit, "vit-"), (m.text, "text-"), (m, "clip-"))
    else:
        components = (
            (m, ""),
            (m.vit, "vit-"),
            (m.projector, "projector-"),
            (m.decoder, "decoder-"),
            (m.cross, "cross-"),
        )
    for obj, prefix in ((run.train, ""), (run.data, ""), *components):
        for f in fields(obj):
            if is_dataclass(getattr(obj, f.name)):
                continue
            name = "data" if obj is run.data and f.name == "root" else prefix + f.name.replace("_", "-")
            out[name] = (obj, f.name)
    return out


# --help lines of the component configs' fields: their own files say the same in a comment on each field, so
# that each file copies alone (tests/test_flags.py checks every field has one)
COMPONENT_HELP = {
    ViTConfig: {
        "image_size": "input images are image_size x image_size pixels",
        "patch_size": "each patch is patch_size x patch_size pixels",
        "channels": "RGB",
        "dim": "width of the patch embeddings and of every block",
        "n_layers": "number of transformer blocks",
        "n_heads": "attention heads per block (dim must divide by it)",
        "mlp_ratio": "hidden width of each MLP is mlp_ratio * dim",
    },
    ProjectorConfig: {
        "in_dim": "width of the vision encoder's outputs",
        "out_dim": "width of the decoder's token embeddings",
        "pixel_shuffle": "s: merge s x s neighbouring patches into one token (1 = off)",
        "hidden_mult": "hidden width of the MLP is hidden_mult * out_dim",
    },
    CLIPConfig: {
        "embed_dim": "width of the shared image-text space",
        "eot_id": "id of <|endoftext|>: the text's vector is read there",
        "init_temperature": "softmax temperature at the start (learned from there)",
        "max_logit_scale": "largest 1/temperature the loss may use",
        "kind": "what config.json says the model is",
    },
    VLMConfig: {
        "fusion": 'how the image joins the text: "prefix" (LLaVA), "cross" (Flamingo) or "early" (no ViT)',
    },
    CrossAttentionConfig: {
        "vision_dim": "width of each feature the resampler reads: the vision encoder's, times s^2 merged",
        "dim": "width of the language model (and of the latents)",
        "n_heads": "attention heads (dim must divide by it)",
        "n_latents": "L: image vectors the text can read, whatever the number of patches",
        "resampler_layers": "Perceiver blocks the latents pass through",
        "every": "a gated cross-attention layer before every `every`-th decoder block, from the first",
        "mlp_ratio": "hidden width of each MLP is mlp_ratio * dim",
        "pixel_shuffle": "s: the model merges s x s neighbouring patches into one feature first (1 = off)",
        "region_latents": "each latent starts from one region of the image, not from a learned vector alone",
    },
    DecoderConfig: {
        "vocab_size": "number of token ids (BPE ranks + special tokens)",
        "max_seq_len": "longest sequence (image tokens + text) the position table covers",
        "dim": "width of the residual stream",
        "n_layers": "number of transformer blocks",
        "n_heads": "attention heads per block (dim must divide by it)",
        "mlp_ratio": "hidden width of each MLP is mlp_ratio * dim",
    },
}


def field_help(obj: object, name: str) -> str:
    """The --help line of field `name` of a config object ('' if it has none)."""
    meta = next(f.metadata for f in fields(obj) if f.name == name)
    return meta.get("help") or COMPONENT_HELP.get(type(obj), {}).get(name, "")


def apply_overrides(run: RunConfig, values: dict[str, str]) -> RunConfig:
    """Set fields from strings given on the command line, converting to each field's type, and check them all.

    Every field is checked once all are set (so their order does not matter), before any work starts; a
    value that cannot work raises a one-line ValueError that starts with the flags to blame.
    """
    run = copy.deepcopy(run)
    table = override_fields(run)
    given = {}
    for name, text in values.items():
        if name not in table:
            raise ValueError(f"--{name} is not a setting; see --help for the list")
        obj, attr = table[name]
        given[name] = _convert(text, getattr(obj, attr), name)
        setattr(obj, attr, given[name])
    try:
        run.finalize()
    except ValueError as e:
        flags = " ".join(f"--{n} {_shown(values[n])}" for n in _blame(table, given, str(e)))
        raise ValueError(f"{flags}: {e}" if flags else str(e)) from None
    for name, (value, why) in _decided_elsewhere(run).items():
        if name in given and given[name] != value:
            raise ValueError(f"--{name} {_shown(values[name])}: {why} ({value}); leave it out")
    _check_machine_and_tokenizer(run)
    return run


def _decided_elsewhere(run: RunConfig) -> dict[str, tuple[object, str]]:
    """Fields that finalize() sets from others (or from the tokenizer): a flag may only repeat their value."""
    m = run.model
    if isinstance(m, CLIPConfig):
        return {
            "vit-image-size": (m.vit.image_size, "--image-size sets it"),
            "vit-channels": (3, "the images are RGB"),
            "text-max-seq-len": (m.text.max_seq_len, "--max-text-len sets it"),
            "text-vocab-size": (run.data.vocab_size, "the tokenizer sets it from --vocab-size"),
            "clip-eot-id": (m.eot_id, "the tokenizer sets it"),
            "clip-kind": ("clip", "it names the kind of model"),
        }
    return {
        "vit-image-size": (m.vit.image_size, "--image-size sets it"),
        "vit-channels": (3, "the images are RGB"),
        "projector-in-dim": (
            (m.patch_values, "early fusion reads raw patches: --vit-patch-size sets it")
            if m.fusion == "early"
            else (m.vit.dim, "--vit-dim sets it")
        ),
        "projector-out-dim": (m.decoder.dim, "--decoder-dim sets it"),
        "cross-vision-dim": (m.vit.dim, "--vit-dim sets it"),
        "cross-dim": (m.decoder.dim, "--decoder-dim sets it"),
        "decoder-max-seq-len": (m.decoder.max_seq_len, "the image tokens plus --max-text-len set it"),
        "decoder-vocab-size": (run.data.vocab_size, "the tokenizer sets it from --vocab-size"),
    }


def _check_machine_and_tokenizer(run: RunConfig) -> None:
    """What fails only late in a run otherwise: the tokenizer's smallest size and a device this machine lacks."""
    smallest = 256 + len(SPECIAL_TOKENS)  # byte-level BPE starts from the 256 single bytes
    if run.data.vocab_size < smallest:
        raise ValueError(
            f"--vocab-size {run.data.vocab_size}: the tokenizer needs 256 byte tokens and {len(SPECIAL_TOKENS)} "
            f"special ones; use at least {smallest}"
        )
    if run.train.device != "auto" and (problem := _missing_device(run.train.device)):
        raise ValueError(f"--device {_shown(run.train.device)}: {problem}")


def _blame(table: dict[str, tuple[object, str]], given: dict[str, object], message: str) -> list[str]:
    """The given flags behind a failed check: those whose field the message names, narrowed to the config
    that fails on its own (two components may share a field name); all given flags if it names none."""
    named = [n for n in given if re.search(rf"\b{table[n][1]}\b", message)]

    def fails_alone(name: str) -> bool:
        try:
            table[name][0].__post_init__()
        except ValueError as e:
            return str(e) == message
        return False

    return [n for n in named if fails_alone(n)] or named or list(given)


def _shown(text: str) -> str:
    """A value as it could be typed in a shell, on one line."""
    return shlex.quote(text) if text.isprintable() else repr(text)


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


# argparse types for the flags of the other commands (caption, eval, data, bench): a bad value stops the
# command before it loads a model or reads data, with argparse's message naming the flag


def positive_int(text: str) -> int:
    """An integer >= 1: a count of steps, images, tokens or threads."""
    return _int_in(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0: a count that may be zero."""
    return _int_in(text, 0)


def random_seed(text: str) -> int:
    """A random seed: an integer in [0, 2**64), the range torch.manual_seed takes."""
    return _int_in(text, 0, 2**64 - 1)


def positive_ints(text: str) -> str:
    """Comma-separated integers >= 1, such as 1,64; returned as given."""
    items = [t for t in text.split(",") if t]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} names no number; give integers >= 1 such as 1,64")
    for item in items:
        _int_in(item, 1)
    return text


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def probability_above_zero(text: str) -> float:
    """A number in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def device(text: str) -> str:
    """A device this machine has: cpu, cuda, cuda:N (or mps)."""
    if problem := _missing_device(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def device_or_auto(text: str) -> str:
    """auto (cuda if there is one) or a device this machine has."""
    return text if text == "auto" else device(text)


def _missing_device(name: str) -> str | None:
    """What is wrong with a device name on this machine, or None if it can be used."""
    try:
        dev = torch.device(name)
    except RuntimeError:  # torch's own message lists device types nanovlm cannot use
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        return f"{name!r} is not a device nanovlm runs on; use cpu, cuda or cuda:N"
    n_gpus = torch.cuda.device_count()
    if dev.type == "cuda" and not n_gpus:
        return "this machine has no CUDA GPU; use cpu"
    if dev.type == "cuda" and (dev.index or 0) >= n_gpus:
        return f"this machine has {n_gpus} CUDA GPU(s), cuda:0 to cuda:{n_gpus - 1}"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return "this machine has no Apple GPU (MPS); use cpu"
    return None


def _int_in(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(
            f"must be an integer >= {low}" + (f" and <= {high}" if high is not None else "") + f", got {value}"
        )
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
