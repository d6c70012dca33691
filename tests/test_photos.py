"""The five real photographs the package ships for notebook 11 (nanovlm/photos): readable, captioned five times
each in COCO's layout, and their captions name no COCO object their object lists lack."""

import json
from pathlib import Path

import nanovlm
from nanovlm import chair
from nanovlm.data import load_image

PHOTOS = Path(nanovlm.__file__).parent / "photos"


def test_every_photo_loads_and_has_five_captions_and_its_objects():
    captions = json.loads((PHOTOS / "captions.json").read_text())
    objects = chair.read_instances(PHOTOS / "instances.json")
    assert len(captions["images"]) == 5 and set(objects) == {im["id"] for im in captions["images"]}
    for image in captions["images"]:
        img = load_image(PHOTOS / image["file_name"])
        assert img.mode == "RGB" and img.size == (image["width"], image["height"])
        written = [a["caption"] for a in captions["annotations"] if a["image_id"] == image["id"]]
        assert len(written) == 5
        named = {c for text in written for c in chair.mentions(text)}
        assert named <= objects[image["id"]], (image["file_name"], named - objects[image["id"]])
