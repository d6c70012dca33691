"""The vision-language model: a vision side and a decoder, joined by one of three fusions.

    prefix (LLaVA, the default):
        image -> ViT -> projector -> image tokens (B, N, D) --+
                                                               +-> [image tokens | text tokens] -> decoder -> logits
        text  -> token ids -> token embeddings (B, T, D) -----+
    cross (Flamingo):
        image -> ViT -> (pixel shuffle) -> Perceiver resampler -> latents (B, L, D) ...> read by gated
                                                                   cross-attention layers in the decoder
        text  -> token embeddings (B, T, D) -> decoder -> logits      (the decoder's sequence is the text alone)
    early (no vision tower, as in Fuyu):
        image -> patches -> projector -> image tokens (B, N, D) -> [image tokens | text tokens] -> decoder -> logits

In the prefix and early fusions the decoder reads the image tokens as if they were words that came before the
text; early fusion leaves all the seeing to the decoder. In cross fusion (nanovlm/cross_attention.py) the text
reads the image from inside the decoder, through layers whose gates start shut. Loss is computed on text
positions only: the image is given, not predicted, and padding or the prompt part of a question carry target
-100, which the loss ignores.

A trained model is saved as a directory: model.safetensors (weights, no pickled code), config.json and
tokenizer.tiktoken.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import check_folder, first_line, read_json, read_tokenizer, read_weights, save_folder
from .cross_attention import CrossAttentionConfig, GatedCrossAttentionBlock, PerceiverResampler, n_cross_layers
from .decoder import Decoder, DecoderConfig, KVCache
from .projector import Projector, ProjectorConfig, pixel_shuffle
from .tokenizer import Tokenizer
from .vit import ViT, ViTConfig, patchify

IGNORE = -100  # target value that the loss skips
FUSIONS = ("prefix", "cross", "early")


@dataclass
class VLMConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fusion: str = "prefix"  # how the image joins the text: "prefix" (LLaVA), "cross" (Flamingo) or "early"
    cross: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)  # fusion "cross" only

    def __post_init__(self) -> None:
        parts = (("vit", ViTConfig), ("projector", ProjectorConfig), ("decoder", DecoderConfig))
        for name, cls in (*parts, ("cross", CrossAttentionConfig)):
            if isinstance(getattr(self, name), dict):  # loaded from config.json
                setattr(self, name, cls(**getattr(self, name)))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion {self.fusion!r} is unknown; choose one of {', '.join(FUSIONS)}")
        if self.fusion == "cross":
            merged = self.vit.dim * self.cross.pixel_shuffle**2  # a feature holds s x s patches
            if self.cross.vision_dim != merged or self.cross.dim != self.decoder.dim:
                raise ValueError(
                    f"cross-attention reads {self.cross.vision_dim}-wide features into a {self.cross.dim}-wide "
                    f"decoder, but the ViT's features, merged {self.cross.pixel_shuffle} x {self.cross.pixel_shuffle}, "
                    f"are {merged} wide and the decoder {self.decoder.dim}; make them match"
                )
            return
        # early fusion: the projector reads raw patches, there is no ViT
        source, width = ("raw patches", self.patch_values) if self.fusion == "early" else ("the ViT", self.vit.dim)
        if self.projector.in_dim != width or self.projector.out_dim != self.decoder.dim:
            raise ValueError(
                f"projector maps {self.projector.in_dim} -> {self.projector.out_dim} but {source} give "
                f"{width} values and the decoder is {self.decoder.dim} wide; make them match"
            )

    def __eq__(self, other: object) -> bool:
        """Two configs are equal when they build the same model: the cross settings count for cross fusion only
        (so a folder saved before fusions existed still matches the run that made it)."""
        if not isinstance(other, VLMConfig):
            return NotImplemented
        mine, theirs = asdict(self), asdict(other)
        for cfg, d in ((self, mine), (other, theirs)):
            if cfg.fusion != "cross":
                del d["cross"]
        return mine == theirs

    @property
    def parts(self) -> tuple[str, ...]:
        """The model's components (attributes of VLM) under this fusion."""
        bridge = ("resampler", "xattn") if self.fusion == "cross" else ("projector",)
        return (*(() if self.fusion == "early" else ("vit",)), *bridge, "decoder")

    @property
    def patch_values(self) -> int:
        """Numbers in one raw patch: what early fusion's projector reads per patch."""
        return self.vit.patch_size**2 * self.vit.channels

    @property
    def n_image_tokens(self) -> int:
        """Positions the image takes in the decoder's sequence (none with cross-attention)."""
        if self.fusion == "cross":
            return 0
        return self.vit.n_patches // self.projector.pixel_shuffle**2

    @property
    def max_text_len(self) -> int:
        return self.decoder.max_seq_len - self.n_image_tokens


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.fusion != "early":
            self.vit = ViT(cfg.vit)
        if cfg.fusion == "cross":
            self.resampler = PerceiverResampler(cfg.cross)
            n = n_cross_layers(cfg.decoder.n_layers, cfg.cross.every)
            self.xattn = nn.ModuleList(GatedCrossAttentionBlock(cfg.cross) for _ in range(n))
        else:
            self.projector = Projector(cfg.projector)
        self.decoder = Decoder(cfg.decoder)
        self.apply(_init_weights)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, N, D) vectors in the decoder's width.

        Prefix and early fusion: the N_img tokens that go in front of the text. Cross fusion: the L latents
        that the gated cross-attention layers read.
        """
        if self.cfg.fusion == "early":
            size, channels = self.cfg.vit.image_size, self.cfg.vit.channels
            if images.shape[-3:] != (channels, size, size):
                raise ValueError(f"expected images of shape (B, {channels}, {size}, {size}), got {tuple(images.shape)}")
            return self.projector(patchify(images * 2 - 1, self.cfg.vit.patch_size))  # pixels centred on 0
        features = self.vit(images)  # (B, N_patches, D_vision)
        if self.cfg.fusion == "cross":
            return self.resampler(pixel_shuffle(features, self.cfg.cross.pixel_shuffle))
        return self.projector(features)

    def word_tokens(self, words: torch.Tensor) -> torch.Tensor:
        """(B, N, K) token ids, -1 for none -> (B, N, D): each position the sum of its words' embeddings.

        What a text stage with a grid of words (loader.Loader(..., grid=side)) puts where the image tokens go:
        the decoder learns to caption from a map of words, and later reads the projector's vectors in its place.
        """
        embedded = self.decoder.embed(words.clamp(min=0))  # (B, N, K, D)
        return (embedded * (words >= 0).unsqueeze(-1)).sum(2)

    def sequence(self, image: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        """The decoder's input: [image tokens | text] for prefix and early fusion, the text alone otherwise."""
        if image is None or self.cfg.fusion == "cross":
            return text
        return torch.cat([image, text], dim=1)

    def hidden(self, x: torch.Tensor, image: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The decoder's final hidden states for the sequence x (B, T, D) made by sequence().

        image is image_tokens()' output (or None for text alone): with cross fusion, the gated layers read it
        before every `every`-th block; with the other fusions it is already in x.
        """
        if image is None or self.cfg.fusion != "cross":
            return self.decoder.hidden(x, cache)
        every = self.cfg.cross.every

        def read_image(i: int, h: torch.Tensor) -> torch.Tensor:
            return self.xattn[i // every](h, image) if i % every == 0 else h

        return self.decoder.hidden(x, cache, before_block=read_image)

    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        words: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for the text positions (B, T, V), and the mean loss over targets != -100 if given.

        images=None runs the decoder on text alone (stage 1: language-model pre-training); words (B, N, K), given
        instead of images, puts word_tokens(words) where the image tokens go.
        """
        text = self.decoder.embed(input_ids)  # (B, T, D)
        if words is not None:
            if words.size(1) != self.cfg.n_image_tokens or self.cfg.fusion == "cross":
                raise ValueError(
                    f"words of shape {tuple(words.shape)} stand in for the image tokens in front of the text; a "
                    f"model with {self.cfg.fusion} fusion has {self.cfg.n_image_tokens} of them"
                )
            image = self.word_tokens(words)
        else:
            image = None if images is None else self.image_tokens(images)
        h = self.hidden(self.sequence(image, text), image)[:, -text.size(1) :]  # text positions only
        logits = self.decoder.head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        return logits, loss

    @torch.inference_mode()  # no_grad, and no autograd bookkeeping either: each small decoding op costs less
    def generate(
        self,
        images: torch.Tensor | None,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        eot: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Continue each prompt (B, Tp) after its image; returns the new tokens per sample, without eot.

        temperature 0 is greedy decoding. use_cache=False recomputes the whole sequence at every step
        (same tokens, much slower: it is there to show what the KV cache saves).
        """
        B = prompt_ids.size(0)
        image = None if images is None else self.image_tokens(images)
        seq = self.sequence(image, self.decoder.embed(prompt_ids))  # (B, N_img + Tp, D)
        max_new_tokens = min(max_new_tokens, self.cfg.decoder.max_seq_len - seq.size(1))
        cache = KVCache(self.cfg.decoder.n_layers, self.cfg.decoder.max_seq_len) if use_cache else None
        out = torch.empty(B, 0, dtype=torch.long, device=prompt_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        step_input = seq
        for _ in range(max_new_tokens):
            h = self.hidden(step_input if use_cache else seq, image, cache)
            logits = self.decoder.head(h[:, -1]).float()  # (B, V) scores for the next token
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            nxt = nxt.masked_fill(done, eot)  # finished sequences keep emitting eot
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eot
            if done.all():
                break
            step_input = self.decoder.embed(nxt[:, None])  # (B, 1, D): only the new token with a cache
            if not use_cache:
                seq = torch.cat([seq, step_input], dim=1)
        return [_until(row, eot) for row in out.tolist()]

    def save(self, directory: str | Path, tokenizer: Tokenizer) -> None:
        """Write model.safetensors, config.json and tokenizer.tiktoken into directory."""
        save_folder(self, self.cfg, tokenizer, directory)

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> tuple["VLM", Tokenizer]:
        """Read a directory written by save(); no pickled code is executed, a damaged file is named."""
        directory = Path(directory)
        check_folder(directory, "model")
        config = directory / "config.json"
        cfg = _read_config(config)
        try:
            model = cls(cfg)
        except (TypeError, ValueError) as e:  # a field of the wrong type fails only when the layers are built
            raise ValueError(f"{config} describes no model that can be built: {first_line(e)}") from e
        read_weights(model, directory / "model.safetensors", device)
        return model.to(device).eval(), _read_tokenizer(directory / "tokenizer.tiktoken", cfg)


def _read_config(path: Path) -> VLMConfig:
    """The VLMConfig in a config.json written by VLM.save; ValueError names the file if it is damaged."""
    raw = read_json(path)
    if isinstance(raw, dict) and raw.get("kind") == "clip":  # what CLIP.save writes
        raise ValueError(
            f"{path} is a contrastive model (CLIP), not a captioner; load it with nanovlm.clip.CLIP.load, "
            "or start a VLM from its ViT"
        )
    parts = ("vit", "projector", "decoder")
    if (
        not isinstance(raw, dict)
        or not set(parts) <= set(raw) <= {*parts, "fusion", "cross"}  # folders saved before fusions have neither
        or not all(isinstance(raw[p], dict) for p in parts)
    ):
        raise ValueError(f"{path} is not a nanovlm config: it must be an object with objects {list(parts)}")
    try:
        return VLMConfig(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid nanovlm config: {first_line(e)}") from e


def _read_tokenizer(path: Path, cfg: VLMConfig) -> Tokenizer:
    """The tokenizer saved with a model, checked against the model's vocabulary."""
    tokenizer = read_tokenizer(path)
    if tokenizer.vocab_size != cfg.decoder.vocab_size:
        # a file cut at a line end still parses, and would fail only when the model emits an id it lost
        raise ValueError(
            f"{path} has {tokenizer.vocab_size} tokens but config.json gives the model a vocab_size of "
            f"{cfg.decoder.vocab_size}: the file is cut short or belongs to another model; copy {path.parent} again"
        )
    return tokenizer


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of (B, V) logits: greedy, or sampled with temperature / top-k / top-p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1) k-th largest score
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        # keep the smallest set of most likely tokens whose probabilities add up to at least top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _until(tokens: list[int], eot: int) -> list[int]:
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style initialisation: small normal weights (the linear layers have no biases)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
