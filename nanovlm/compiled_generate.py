"""Generation with a fixed-shape KV cache and one compiled decoding step.

At batch 1 a small model's decoding step is not bound by arithmetic: each new token runs dozens of small
operations (every linear layer, layer norm and reshape, the cache's writes), and launching them costs more
than computing them. `torch.compile` fuses such chains into a few kernels, but only for shapes it has seen:
`VLM.generate`'s cache hands attention the keys written so far, one position longer at every token, so
a compiled step would meet a new shape each time and recompile.

Here the step keeps every shape fixed instead:

    keys, values    the cache's whole (B, heads, max_len, head size) buffers, not the written part;
    pos             the new token's position, a tensor, so its value changes and the graph does not;
    write           keys[:, :, pos] = k with index_copy_, in place;
    attend          over all max_len positions, hiding the unwritten ones with the mask arange(max_len) <= pos.

Hidden positions get zero weight, so the step computes what the growing cache computes, token for token
(tests/test_compiled_generate.py checks the tokens). The prompt (image tokens and prompt text) still runs as one
ordinary pass that fills the cache; only the steps after it are compiled.

    gen = CompiledGenerator(model)                    # compiles on the first call, once per batch size
    gen.generate(images, prompt_ids, 32, eot=tok.eot)  # what model.generate returns, in less time per token

Compiling takes seconds, so it pays for itself over many tokens: a benchmark or a long run of captions.
"""

import torch
import torch.nn.functional as F
from einops import rearrange

from .decoder import KVCache
from .vlm import VLM, _until, sample_next


class CompiledGenerator:
    """VLM.generate with a fixed-shape cache; compile=False runs the same step eagerly (for tests and reading)."""

    def __init__(self, model: VLM, compile: bool = True) -> None:
        self.model = model
        self.step = torch.compile(self._step, dynamic=False) if compile else self._step

    @torch.inference_mode()
    def generate(
        self,
        images: torch.Tensor | None,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        eot: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Continue each prompt (B, Tp) after its image, as VLM.generate does; returns the new tokens, without eot."""
        model, max_len = self.model, self.model.cfg.decoder.max_seq_len
        B = prompt_ids.size(0)
        image = None if images is None else model.image_tokens(images)
        seq = model.sequence(image, model.decoder.embed(prompt_ids))  # (B, N_img + Tp, D)
        max_new_tokens = min(max_new_tokens, max_len - seq.size(1))
        if max_new_tokens <= 0:
            return [[] for _ in range(B)]
        cache = KVCache(model.cfg.decoder.n_layers, max_len)
        # the prompt in one ordinary pass: it fills the cache's (B, nh, max_len, hs) buffers up to cache.pos
        logits = model.decoder.head(model.hidden(seq, image, cache)[:, -1])  # (B, V)
        pos = torch.tensor(cache.pos, device=prompt_ids.device)  # where the next token goes
        out = torch.empty(B, 0, dtype=torch.long, device=prompt_ids.device)
        done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
        for t in range(max_new_tokens):
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)  # (B,)
            nxt = nxt.masked_fill(done, eot)  # finished sequences keep emitting eot
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eot
            if done.all() or t == max_new_tokens - 1:
                break
            logits = self.step(nxt[:, None], pos, image, cache.k, cache.v)
            pos = pos + 1
        return [_until(row, eot) for row in out.tolist()]

    def _step(
        self,
        token: torch.Tensor,
        pos: torch.Tensor,
        image: torch.Tensor | None,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """One token (B, 1) at position pos (a 0-dim tensor) -> next-token logits (B, V).

        The decoder's blocks written out for one token over fixed-shape buffers: keys[i] and values[i] are
        layer i's (B, heads, max_len, head size) cache, and this token's key and value are written into them.
        """
        model, decoder = self.model, self.model.decoder
        x = decoder.embed(token) + decoder.pos_embed(pos)  # (B, 1, D)
        written = (torch.arange(decoder.cfg.max_seq_len, device=pos.device) <= pos)[None]  # (1, max_len) keys to see
        at = pos.reshape(1)  # index_copy_ takes a 1-D index
        for i, block in enumerate(decoder.blocks):
            if image is not None and model.cfg.fusion == "cross" and i % model.cfg.cross.every == 0:
                x = model.xattn[i // model.cfg.cross.every](x, image)  # as VLM.hidden's read_image does
            attn = block.attn
            q, k, v = rearrange(attn.qkv(block.ln1(x)), "b t (three h d) -> three b h t d", three=3, h=attn.n_heads)
            keys[i].index_copy_(2, at, k)
            values[i].index_copy_(2, at, v)
            y = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=written)  # (B, nh, 1, hs)
            x = x + attn.proj(rearrange(y, "b h t d -> b t (h d)"))
            x = x + block.mlp(block.ln2(x))
        return decoder.head(decoder.ln_f(x))[:, -1]
