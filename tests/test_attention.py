"""attention.py, the teaching version, and the copies of it that vit.py and decoder.py carry so that each file
copies alone: the same numbers, the same KV cache, written the same way."""

import inspect

import pytest
import torch

from nanovlm import attention, decoder, vit
from nanovlm.attention import KVCache, MultiHeadAttention, attention_math, attention_sdpa, causal_mask, padding_mask


@pytest.mark.parametrize("causal", [False, True])
def test_math_attention_equals_sdpa(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 7, 16).unbind(0)
    mask = causal_mask(7, 7) if causal else None
    out, weights = attention_math(q, k, v, mask)
    torch.testing.assert_close(out, attention_sdpa(q, k, v, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))


def test_padding_mask_hides_padded_keys():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(2, 6, 32)
    lengths = torch.tensor([6, 3])
    y = mha(x, lengths=lengths, use_sdpa=False)
    x2 = x.clone()
    x2[1, 3:] = torch.randn(3, 32)  # change only the padding of sequence 1
    y2 = mha(x2, lengths=lengths)
    torch.testing.assert_close(y[1, :3], y2[1, :3], atol=1e-5, rtol=1e-5)
    assert padding_mask(lengths, 6)[1, 0, 0].tolist() == [True] * 3 + [False] * 3


def test_teaching_attention_matches_component_copies():
    """attention.py, vit.py and decoder.py compute the same function given the same weights, with a cache too."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    vit_attn = vit.SelfAttention(32, 4)
    vit_attn.load_state_dict(mha.state_dict())
    dec_attn = decoder.Decoder(decoder.DecoderConfig(vocab_size=10, max_seq_len=16, dim=32, n_layers=1, n_heads=4))
    dec_attn = dec_attn.blocks[0].attn
    dec_attn.load_state_dict(mha.state_dict())
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(vit_attn(x), mha(x, use_sdpa=False), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec_attn(x), mha(x, causal=True, use_sdpa=False), atol=1e-5, rtol=1e-5)
    teaching, component = attention.KVCache(1, 9), decoder.KVCache(1, 9)
    for a, b in [(0, 4), (4, 5), (5, 9)]:  # a prompt, one token, a chunk
        torch.testing.assert_close(
            dec_attn(x[:, a:b], component), mha(x[:, a:b], causal=True, cache=teaching), atol=1e-5, rtol=1e-5
        )


def test_kv_cache_matches_full_causal_pass():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(2, 8, 32)
    full = mha(x, causal=True)
    cache = KVCache(n_layers=1, max_len=8)
    steps = [mha(x[:, :5], causal=True, cache=cache)] + [
        mha(x[:, t : t + 1], causal=True, cache=cache) for t in range(5, 8)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 8


def test_kv_cache_moves_on_when_the_last_layer_has_written():
    cache = KVCache(n_layers=2, max_len=5)
    k = torch.randn(1, 2, 3, 4)  # (B, nh, T, hs)
    keys, _ = cache.update(0, k, k)
    assert cache.pos == 0 and keys.shape == (1, 2, 3, 4)  # layer 1 still writes at the same positions
    keys, _ = cache.update(1, 2 * k, 2 * k)
    assert cache.pos == 3 and torch.equal(keys, 2 * k)
    keys, values = cache.update(0, k[:, :, :1], -k[:, :, :1])
    assert keys.shape == (1, 2, 4, 4) and torch.equal(keys[:, :, 3:], k[:, :, :1]) and cache.pos == 3
    torch.testing.assert_close(values[:, :, :3], k)
    with pytest.raises(IndexError, match="layer 2 does not exist: this cache has n_layers = 2"):
        cache.update(2, k, k)
    with pytest.raises(ValueError, match="sequence of 6 positions exceeds the cache's max_len 5"):
        cache.update(1, k, k)


def test_kv_cache_and_causal_mask_are_the_same_code_in_attention_and_decoder():
    for name in ("KVCache", "causal_mask"):
        assert inspect.getsource(getattr(attention, name)) == inspect.getsource(getattr(decoder, name)), (
            f"nanovlm/attention.py and nanovlm/decoder.py hold different {name}s: make the two copies identical"
        )


def test_self_attention_splits_and_merges_heads_the_same_way_in_every_copy():
    def reshapes(forward) -> list[str]:
        return [line.strip() for line in inspect.getsource(forward).splitlines() if "rearrange(" in line]

    teaching = reshapes(attention.MultiHeadAttention.forward)
    assert len(teaching) == 2
    assert reshapes(vit.SelfAttention.forward) == teaching
    assert reshapes(decoder.CausalSelfAttention.forward) == teaching
