"""The laptop split of COCO (coco.make_laptop_split): val2017 cut into train / val / test by a fixed order of its
ids, laid out like any COCO split. Built on the 80 real photos of ../shared/data/coco-sample, renamed val2017."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from nanovlm.__main__ import main
from nanovlm.coco import laptop_order, make_laptop_split, write_subsets
from nanovlm.data import PackedSplit, prepare

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-sample"
SIZES = {"laptop-train": 60, "laptop-val": 10, "laptop-test": 10}
pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason="needs ../shared/data/coco-sample")


@pytest.fixture
def root(tmp_path) -> Path:
    """The sample in val2017's place: annotations/captions_val2017.json, instances_val2017.json, val2017/."""
    (tmp_path / "annotations").mkdir()
    for kind in ("captions", "instances"):
        shutil.copy(
            SAMPLE / "annotations" / f"{kind}_train2017.json", tmp_path / "annotations" / f"{kind}_val2017.json"
        )
    shutil.copytree(SAMPLE / "train2017", tmp_path / "val2017")
    return tmp_path


def test_the_order_depends_on_the_ids_alone():
    ids = [139, 285, 632, 724, 776]
    expected = sorted(ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
    assert laptop_order(ids) == laptop_order(list(reversed(ids))) == expected


def test_the_split_is_disjoint_recorded_and_packs_like_any_coco_split(root):
    assert make_laptop_split(root, sizes=SIZES) == SIZES
    record = json.loads((root / "annotations" / "laptop_split.json").read_text())
    ids = [i for name in SIZES for i in record[name]]
    assert len(ids) == len(set(ids)) == 80
    assert ids == laptop_order(ids)  # train first, then val, then test, in the fixed order
    for name, n in SIZES.items():
        split = PackedSplit(prepare(root, name, 32))
        assert sorted(split.image_ids) == sorted(record[name]) and len(split) == n
        assert all(len(refs) >= 5 for refs in split.captions)
        instances = json.loads((root / "annotations" / f"instances_{name}.json").read_text())
        assert {a["image_id"] for a in instances["annotations"]} <= set(record[name])
    assert make_laptop_split(root, sizes=SIZES) == SIZES  # again: the same split, nothing to redo


def test_a_subset_of_chosen_photos_is_a_split_of_its_own(root):
    """What notebook 11 does to hold one photo out: the others in one split, that photo alone in another."""
    ids = [im["id"] for im in json.loads((root / "annotations" / "captions_val2017.json").read_text())["images"]]
    write_subsets(root, "val2017", {"without-first": ids[1:], "only-first": ids[:1]})
    rest, alone = PackedSplit(prepare(root, "without-first", 32)), PackedSplit(prepare(root, "only-first", 32))
    assert alone.image_ids == ids[:1] and sorted(rest.image_ids) == sorted(ids[1:])
    instances = json.loads((root / "annotations" / "instances_only-first.json").read_text())
    assert [im["id"] for im in instances["images"]] == ids[:1]
    assert instances["annotations"] and {a["image_id"] for a in instances["annotations"]} == {ids[0]}
    with pytest.raises(ValueError, match="captions_val2017.json: no image with id 12345678"):
        write_subsets(root, "val2017", {"nothing": [12345678]})


def test_a_photo_missing_on_disk_is_left_out_and_named(root, capsys):
    gone = sorted((root / "val2017").iterdir())[0]
    gone.unlink()
    counts = make_laptop_split(root, sizes={"laptop-train": 60, "laptop-val": 9, "laptop-test": 10})
    assert sum(counts.values()) == 79
    assert (
        f"1 captioned image(s) of val2017 are not on disk and are left out, e.g. {gone.name}" in capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="val2017 has 79 usable images; the laptop split needs 80"):
        make_laptop_split(root, sizes=SIZES)


def test_the_command_names_what_is_missing(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "coco", "--laptop", "--no-download", "--root", str(root)])
    assert exit_info.value.code == 2
    assert "val2017 has 80 usable images; the laptop split needs 5000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "coco", "--laptop", "--no-download", "--root", str(tmp_path / "nothing")])
    assert "captions_val2017.json not found; run `python -m nanovlm data coco` first" in capsys.readouterr().err
