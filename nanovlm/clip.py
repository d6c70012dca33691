"""CLIP: a contrastive dual encoder that puts images and their captions at the same point of one space.

    image (B, 3, H, W) -> ViT -> max over patches -> image_proj -> normalise -> I (B, E)
    text  (B, T) ids   -> causal transformer -> hidden state at <|endoftext|> -> text_proj -> normalise -> T (B, E)

Both vectors have length 1, so <I_i, T_j> is the cosine similarity of image i and caption j. In a batch of
B pairs, caption i is the right answer for image i and the B - 1 other captions are the wrong ones (and the
other way round), so training is a B-way classification in both directions, symmetric InfoNCE:

    L = -1/(2B) Σ_i [ log softmax_j(s · <I_i, T_j>)_i + log softmax_j(s · <T_i, I_j>)_i ],
    s = exp(clamp(log_scale, max=log 100)).

s = 1 / temperature sharpens the softmax; it is learned (as its logarithm, so that it stays positive and a
step changes it by a factor). CLIP clips it to at most 100 after each optimizer step, which its authors
found necessary to keep training stable; a model cannot reach the optimizer, so here the parameter is
clamped where it is used (`clip_loss`): above log 100 it stops receiving gradient and s stays 100.

The more wrong captions per image, the harder the task and the better the features, so across several
processes the embeddings are gathered and every image is scored against the captions of the whole global
batch (`gather_with_grad`).

Why this is worth training: the two encoders meet only in the similarity, so each works alone afterwards.
Zero-shot classification comes for free: write each class as a caption ("a red circle", "a blue square"),
encode them once, and give an image the class whose caption vector is nearest; no classifier is trained,
and a new class is a new sentence. Retrieval too: encode a collection once, and a caption ranks the images
(or an image the captions) by one matrix product. And the ViT has learned to see what language names
(colours, shapes, where things are), so a VLM can start from it instead of from noise: its weights fit
`VLM.vit` as they are when the two ViTConfigs agree.

The text encoder is nanovlm's decoder read as an encoder: its causal mask lets the state at the first
<|endoftext|> see the whole caption and nothing after it (padding), so that state stands for the caption,
as in CLIP. Its tied output head is never used.

The model and its loss need only torch, vit.py and decoder.py, so the three files copy alone into another
project; save/load use nanovlm's checkpoint.py (the saved-folder format both model kinds share), imported when called.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

if __package__:  # inside nanovlm, or inside any package the three files are copied into
    from .decoder import Decoder, DecoderConfig
    from .vit import ViT, ViTConfig
else:  # copied alone into a folder beside vit.py and decoder.py
    from decoder import Decoder, DecoderConfig
    from vit import ViT, ViTConfig

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


@dataclass
class CLIPConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)  # the image encoder
    text: DecoderConfig = field(default_factory=DecoderConfig)  # the text encoder: a causal transformer over BPE tokens
    embed_dim: int = 64  # width of the shared image-text space
    pool: str = "max"  # how the patch vectors become one image vector: "max" or "mean" (see encode_image)
    eot_id: int = 0  # id of <|endoftext|>: the text's vector is the hidden state at its first occurrence
    init_temperature: float = 0.07  # CLIP's initial softmax temperature
    max_logit_scale: float = 100.0  # CLIP clamps 1/temperature to at most 100
    kind: str = "clip"  # written to config.json so a loader can tell a CLIP checkpoint from a captioner's

    def __post_init__(self) -> None:
        for name, cls in (("vit", ViTConfig), ("text", DecoderConfig)):
            if isinstance(getattr(self, name), dict):  # loaded from config.json
                setattr(self, name, cls(**getattr(self, name)))
            if not isinstance(getattr(self, name), cls):
                got = type(getattr(self, name)).__name__
                raise TypeError(f"CLIPConfig.{name} must be a {cls.__name__} or a dict of its fields, got {got}")
        if self.kind != "clip":
            raise ValueError(f"CLIPConfig kind must be 'clip', got {self.kind!r}")
        if self.pool not in ("max", "mean"):
            raise ValueError(f"CLIP pool must be 'max' or 'mean', got {self.pool!r}")
        if self.embed_dim < 1:
            raise ValueError(f"CLIP embed_dim must be at least 1, got {self.embed_dim}")
        if not 0 <= self.eot_id < self.text.vocab_size:
            raise ValueError(
                f"CLIP eot_id {self.eot_id} is no token of the text encoder (vocab_size {self.text.vocab_size}); "
                "set it to the tokenizer's <|endoftext|> id, tokenizer.eot"
            )
        if not (self.init_temperature > 0 and self.max_logit_scale > 0):
            raise ValueError(
                f"CLIP init_temperature ({self.init_temperature}) and max_logit_scale ({self.max_logit_scale}) "
                "must both be positive"
            )
        if 1 / self.init_temperature > self.max_logit_scale:
            # the clamp would hold the scale at its maximum from the first step, where it gets no gradient
            raise ValueError(
                f"CLIP init_temperature {self.init_temperature} starts the logit scale at "
                f"{1 / self.init_temperature:.4g}, above max_logit_scale {self.max_logit_scale}; raise one of them"
            )


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes; (0, 1) when torch.distributed is not running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns each rank the gradient of its own slice.

    Every rank's loss uses every rank's embeddings, so the gradient of rank r's slice is the sum of what
    all the ranks' losses send it: backward sums the incoming gradients over ranks (all_reduce) and keeps
    the local slice. dist.all_gather itself carries no gradient, and keeping only what this rank's own loss
    sends would miss the other ranks' negatives.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())  # needs the same local batch size on every rank
        return torch.cat(parts)  # (W * B, ...), rank 0's rows first

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, world = _rank_and_world()
        grad = grad.contiguous().clone()  # all_reduce writes in place; autograd may hold this tensor elsewhere
        dist.all_reduce(grad)  # sum over ranks, then keep our slice: a collective that every backend has
        B = grad.size(0) // world
        return grad[rank * B : (rank + 1) * B]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W processes -> (W * B, ...) on every one, gradient flowing back to each slice."""
    if _rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def clip_logits(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, max_logit_scale: float = 100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled similarities of the local rows against the global batch: (logits_per_image, logits_per_text).

    image_emb, text_emb: (B, E) unit vectors of B matching pairs; both results are (B, W * B), and row i's
    right answer is column rank * B + i.
    """
    scale = logit_scale.clamp(max=math.log(max_logit_scale)).exp()  # s; see the module docstring
    all_images, all_texts = gather_with_grad(image_emb), gather_with_grad(text_emb)  # (W * B, E) each
    logits_per_image = scale * image_emb @ all_texts.T  # (B, W * B): s <I_i, T_j>
    logits_per_text = scale * text_emb @ all_images.T  # (B, W * B): s <T_i, I_j>
    return logits_per_image, logits_per_text


def _infonce(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies, the right answers on the (offset) diagonal."""
    rank, _ = _rank_and_world()
    B = logits_per_image.size(0)
    labels = torch.arange(rank * B, (rank + 1) * B, device=logits_per_image.device)  # (B,)
    loss_images = F.cross_entropy(logits_per_image.float(), labels)
    loss_texts = F.cross_entropy(logits_per_text.float(), labels)
    return (loss_images + loss_texts) / 2


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, max_logit_scale: float = 100.0
) -> torch.Tensor:
    """Symmetric InfoNCE of B matching (B, E) unit vectors; under torch.distributed, against the global batch.

    With W processes each holding B pairs, the mean of the W losses is the loss of one process holding all
    W * B pairs.
    """
    return _infonce(*clip_logits(image_emb, text_emb, logit_scale, max_logit_scale))


class CLIP(nn.Module):
    """Image and text encoders projected into one space where a picture and its caption point the same way."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vit = ViT(cfg.vit)
        self.text = Decoder(cfg.text)  # its tied output head is simply unused
        self.image_proj = nn.Linear(cfg.vit.dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))  # log s
        self.apply(_init_weights)

    def scale(self) -> torch.Tensor:
        """s = 1 / temperature, as the loss uses it: exp(log_scale) clamped at max_logit_scale."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, E) unit vectors."""
        size = self.cfg.vit.image_size
        if images.ndim != 4 or images.shape[-2:] != (size, size):
            raise ValueError(
                f"CLIP's ViT takes images of {size}x{size} pixels, shape (B, 3, {size}, {size}); got shape "
                f"{tuple(images.shape)}: resize them, or build the model with that vit.image_size"
            )
        patches = self.vit(images)  # (B, N, D_vit)
        # max: each feature's strongest response, wherever it is; a small object covers a few patches of
        # many, and a mean would dilute them in the background
        x = patches.amax(dim=1) if self.cfg.pool == "max" else patches.mean(dim=1)  # (B, D_vit)
        return F.normalize(self.image_proj(x), dim=-1)  # (B, E)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, E) unit vectors, read at each row's first eot_id (its last token if it has none)."""
        if ids.ndim != 2 or ids.size(1) == 0:
            raise ValueError(
                f"CLIP.encode_text needs a (B, T) batch of token ids with T >= 1, got shape {tuple(ids.shape)}; "
                "end every caption with <|endoftext|>"
            )
        B, T = ids.shape
        h = self.text.hidden(self.text.embed(ids))  # (B, T, D_text)
        is_eot = ids == self.cfg.eot_id  # (B, T)
        # argmax returns the first of equal maxima, i.e. the first eot; a row cut before its eot is read at its end
        where = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), T - 1)  # (B,)
        x = h[torch.arange(B, device=ids.device), where]  # (B, D_text)
        return F.normalize(self.text_proj(x), dim=-1)  # (B, E)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B matching images and captions -> (logits_per_image (B, B_global), symmetric InfoNCE loss)."""
        logits_per_image, logits_per_text = clip_logits(
            self.encode_image(images), self.encode_text(ids), self.logit_scale, self.cfg.max_logit_scale
        )
        return logits_per_image, _infonce(logits_per_image, logits_per_text)

    def save(self, directory: str | Path, tokenizer: "Tokenizer") -> None:
        """Write model.safetensors, config.json and tokenizer.tiktoken into directory."""
        from .checkpoint import save_folder

        if tokenizer.vocab_size != self.cfg.text.vocab_size or tokenizer.eot != self.cfg.eot_id:
            raise ValueError(
                f"the tokenizer ({tokenizer.vocab_size} tokens, <|endoftext|> = {tokenizer.eot}) is not this "
                f"model's (vocab_size {self.cfg.text.vocab_size}, eot_id {self.cfg.eot_id}); save the one it was "
                "trained with"
            )
        save_folder(self, self.cfg, tokenizer, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> tuple["CLIP", "Tokenizer"]:
        """Read a directory written by save(); no pickled code is executed, a damaged file is named."""
        from .checkpoint import check_folder, first_line, read_weights

        directory = Path(directory)
        check_folder(directory, "CLIP model")
        config = directory / "config.json"
        cfg = _read_config(config)
        try:
            model = cls(cfg)
        except (TypeError, ValueError) as e:  # a field of the wrong type fails only when the layers are built
            raise ValueError(f"{config} describes no CLIP model that can be built: {first_line(e)}") from e
        read_weights(model, directory / "model.safetensors", device)
        return model.to(device).eval(), _read_tokenizer(directory / "tokenizer.tiktoken", cfg)


def _read_config(path: Path) -> CLIPConfig:
    """The CLIPConfig in a config.json written by CLIP.save; ValueError names the file if it is not one."""
    from .checkpoint import first_line, read_json

    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a nanovlm config: it must be a JSON object")
    if raw.get("kind") != "clip":
        if "decoder" in raw:  # what VLM.save writes
            raise ValueError(
                f"{path} is a captioning model (VLM), not a contrastive one (CLIP); load it with nanovlm.vlm.VLM.load"
            )
        raise ValueError(f"{path} is not a CLIP config: its kind is {raw.get('kind')!r}, not 'clip'")
    try:
        return CLIPConfig(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid CLIP config: {first_line(e)}") from e


def _read_tokenizer(path: Path, cfg: CLIPConfig) -> "Tokenizer":
    """The tokenizer saved with a model, checked against the text encoder's vocabulary and eot_id."""
    from .checkpoint import read_tokenizer

    tokenizer = read_tokenizer(path)
    if tokenizer.vocab_size != cfg.text.vocab_size or tokenizer.eot != cfg.eot_id:
        raise ValueError(
            f"{path} has {tokenizer.vocab_size} tokens with <|endoftext|> = {tokenizer.eot}, but config.json gives "
            f"the text encoder vocab_size {cfg.text.vocab_size} and eot_id {cfg.eot_id}: the file is cut short or "
            f"belongs to another model; copy {path.parent} again"
        )
    return tokenizer


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation, as in vlm.py: small normal weights (the linear layers have no biases)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
