from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_scenes(tmp_path_factory) -> Path:
    """A small scenes dataset (32 px) with its train/val/test splits packed, shared by the tests."""
    from nanovlm import scenes
    from nanovlm.data import prepare

    root = tmp_path_factory.mktemp("scenes")
    scenes.generate(
        root, scenes.SceneConfig(image_size=32, n_train=128, n_val=32, n_test=32, n_novel=8), progress=False
    )
    for split in ("train", "val", "test"):
        prepare(root, split, 32)
    return root
