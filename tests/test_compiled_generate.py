"""Generation with a fixed-shape cache and a compiled step gives VLM.generate's tokens, from one compiled graph."""

import pytest
import torch
import torch._dynamo.utils
from test_fusion import V, tiny_model

from nanovlm.compiled_generate import CompiledGenerator


@pytest.mark.parametrize("fusion", ["prefix", "early", "cross", "cross-every-2", "cross-regions"])
def test_the_fixed_shape_step_gives_the_same_tokens_to_the_last_position(fusion):
    name = fusion.split("-")[0]
    model = tiny_model(name, every=2 if fusion.endswith("every-2") else 1, regions=fusion.endswith("regions"))
    images, prompt = torch.rand(3, 3, 32, 32), torch.randint(V, (3, 2))
    room = model.cfg.decoder.max_seq_len - model.cfg.n_image_tokens - 2  # new tokens until the context is full
    expected = model.generate(images, prompt, room + 5, eot=-1)
    assert [len(row) for row in expected] == [room] * 3
    assert CompiledGenerator(model, compile=False).generate(images, prompt, room + 5, eot=-1) == expected


def test_text_alone_and_a_full_prompt_as_generate_does():
    model = tiny_model("prefix")
    gen = CompiledGenerator(model, compile=False)
    prompt = torch.randint(V, (2, 3))
    assert gen.generate(None, prompt, 10, eot=-1) == model.generate(None, prompt, 10, eot=-1)
    full = torch.randint(V, (2, model.cfg.decoder.max_seq_len - model.cfg.n_image_tokens))
    assert gen.generate(torch.rand(2, 3, 32, 32), full, 10, eot=-1) == [[], []]


def test_rows_stop_at_end_of_text_and_sampling_draws_the_same_tokens():
    model = tiny_model("prefix")
    gen = CompiledGenerator(model, compile=False)
    images, prompt = torch.rand(4, 3, 32, 32), torch.randint(V, (4, 1))
    greedy = model.generate(images, prompt, 12, eot=-1)
    # a token some caption comes to only later: that row ends there, the others go on or end elsewhere
    r, cut = next((r, i) for r, row in enumerate(greedy) for i in range(1, 12) if row[i] not in row[:i])
    eot = greedy[r][cut]
    expected = model.generate(images, prompt, 12, eot=eot)
    assert expected[r] == greedy[r][:cut] and len({len(row) for row in expected}) > 1
    assert gen.generate(images, prompt, 12, eot=eot) == expected

    def sample(generate):
        seeded = torch.Generator().manual_seed(3)
        return generate(images, prompt, 12, eot=eot, temperature=1.0, top_k=20, generator=seeded)

    assert sample(gen.generate) == sample(model.generate)


def test_compiled_it_is_one_graph_for_every_position_and_prompt_length():
    model = tiny_model("prefix")
    gen = CompiledGenerator(model)
    images, prompt = torch.rand(2, 3, 32, 32), torch.randint(V, (2, 2))
    torch._dynamo.reset()  # forget graphs compiled by earlier tests, so that what this one compiles is all there is
    torch._dynamo.utils.counters.clear()
    short = gen.generate(images, prompt, 10, eot=-1)
    longer = gen.generate(images, prompt[:, :1], 20, eot=-1)  # other positions, another prompt length
    assert short == model.generate(images, prompt, 10, eot=-1)
    assert longer == model.generate(images, prompt[:, :1], 20, eot=-1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
