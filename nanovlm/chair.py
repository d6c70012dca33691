"""CHAIR on COCO: which of COCO's 80 object categories a caption names, and how many of them the photo lacks.

CHAIR (Rohrbach et al., 2018, "Object Hallucination in Image Captioning") reads each caption for words that
name one of COCO's object categories ("man", "guy" and "skier" all name `person`; "motorbike" names
`motorcycle`) and calls a category hallucinated when the photo does not hold it. What the photo holds is the
union of two sources: the categories of its instance annotations, and the categories its five reference
captions name (the annotators of boxes and of captions each miss things the other saw).

    CHAIR_i = hallucinated mentions / mentions        CHAIR_s = captions with a hallucinated mention / captions

A mention is one category named by one caption, counted once however often the caption names it. Both rates
grow with caption length (more objects named, more chances to be wrong), so report them with the mean length.

The word lists below are this project's, written from COCO's category names and the words its captions use;
they follow the paper's rules: plurals count ("dogs"), a longer name wins over a word inside it ("hot dog"
is food, not a dog; "teddy bear" is not a bear), and words whose everyday sense is not the category are left
out ("orange" is usually a colour: only "oranges" and "orange slice" count as the fruit).
"""

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

SPORTS = ("baseball", "tennis", "soccer", "football", "basketball", "volleyball")
SYNONYMS: dict[str, tuple[str, ...]] = {  # category -> the words and phrases (singular) that name it
    "person": (
        "person", "people", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "guy", "lady",
        "gentleman", "teen", "teenager", "player", "skier", "surfer", "skateboarder", "snowboarder",
        "rider", "biker", "cyclist", "pedestrian", "worker", "chef", "cook", "officer", "policeman", "soldier",
        "batter", "catcher", "pitcher", "umpire", "athlete", "spectator", "crowd", "friend",
        "customer", "tourist", "student", "doctor", "groom", "bride", "mother", "father", "son", "daughter",
        "astronaut", "photographer",
        *(f"{sport} {who}" for sport in SPORTS for who in ("player", "team", "fan")),
    ),
    "bicycle": ("bicycle", "bike", "cycle"),
    "car": ("car", "taxi", "cab", "sedan", "suv", "jeep", "van", "minivan", "automobile"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "scooter", "moped", "dirt bike"),
    "airplane": ("airplane", "plane", "jet", "aircraft", "airliner", "aeroplane", "jetliner"),
    "bus": ("bus", "trolley", "double decker"),
    "train": ("train", "locomotive", "tram", "subway", "railcar"),
    "truck": ("truck", "pickup", "lorry", "tractor trailer", "fire truck", "semi"),
    "boat": ("boat", "ship", "sailboat", "kayak", "canoe", "yacht", "ferry", "raft", "tugboat", "rowboat"),
    "traffic light": ("traffic light", "stop light", "stoplight", "traffic signal"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench",),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "owl", "eagle", "hawk", "crow"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "doggy"),
    "horse": ("horse", "pony", "foal", "colt", "stallion", "mare"),
    "sheep": ("sheep", "lamb", "ram", "ewe"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "oxen", "steer"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly", "polar bear"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "back pack", "knapsack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse", "hand bag"),
    "tie": ("tie", "necktie", "bow tie"),
    "suitcase": ("suitcase", "luggage", "suit case"),
    "frisbee": ("frisbee",),
    "skis": ("ski", "skis"),
    "snowboard": ("snowboard",),
    "sports ball": ("ball", "soccer ball", "football", "baseball", "basketball", "tennis ball", "volleyball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard", "skate board"),
    "surfboard": ("surfboard", "surf board", "paddle board"),
    "tennis racket": ("tennis racket", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "glass of wine"),
    "cup": ("cup", "mug", "coffee cup"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "sub", "wrap"),
    "orange": ("oranges", "orange slice", "tangerine", "clementine", "mandarin"),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog", "sausage", "bratwurst"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake"),
    "chair": ("chair", "stool", "armchair", "seat"),
    "couch": ("couch", "sofa", "loveseat"),
    "potted plant": ("potted plant", "houseplant", "house plant", "plant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal", "toilet seat", "toilet bowl"),
    "tv": ("tv", "television", "tv screen"),
    "laptop": ("laptop", "computer", "notebook computer"),
    "mouse": ("mouse",),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "cellphone", "phone", "smartphone", "mobile phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel"),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors", "scissor"),
    "teddy bear": ("teddy bear", "teddy", "stuffed animal", "stuffed bear"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer"),
    "toothbrush": ("toothbrush", "tooth brush"),
}  # fmt: skip
# phrases that contain a category's word but name no object of it: a phone booth holds no phone, a baseball
# field no ball; matched like the names, they keep their words from being read as one
NO_OBJECT = (
    "phone booth", "cutting board", "train station", "train track", "bus stop", "bus station", "couple of",
    *(f"{sport} {place}" for sport in SPORTS for place in (
        "field", "game", "uniform", "cap", "court", "match", "diamond", "pitch", "stadium", "net", "park",
        "practice", "outfit", "shoe")),
)  # fmt: skip
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "mice": "mouse", "knives": "knife",
             "geese": "goose", "glasses": "glass", "buses": "bus"}  # fmt: skip
# words that end in s but are the form the word lists use ("people", "skis", "oranges"), or are not plurals
NOT_PLURAL = ("people", "skis", "scissors", "oranges", "canvas", "this")  # "-ss" and "-us" words are kept anyway
WORD = re.compile(r"[a-z]+")


def singular(word: str) -> str:
    """The singular of a lower-case caption word, by COCO's needs: "dogs" -> "dog", "buses" -> "bus"."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in NOT_PLURAL or len(word) < 4 or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    return word[:-1] if word.endswith("s") else word


_PHRASES: dict[str, str | None] = dict.fromkeys(NO_OBJECT)  # phrase (singular words) -> category, or None
for _category, _words in SYNONYMS.items():
    for _phrase in _words:
        _PHRASES[_phrase] = _category
_LONGEST = max(len(p.split()) for p in _PHRASES)


def mentions(caption: str) -> list[str]:
    """The categories a caption names, each once, in the order it first names them; longest phrases first."""
    words = [singular(w) for w in WORD.findall(caption.lower())]
    found, i = [], 0
    while i < len(words):
        for n in range(min(_LONGEST, len(words) - i), 0, -1):
            phrase = " ".join(words[i : i + n])
            if phrase in _PHRASES:
                category = _PHRASES[phrase]
                if category is not None and category not in found:
                    found.append(category)
                i += n
                break
        else:
            i += 1
    return found


def read_instances(path: str | Path) -> dict:
    """image id -> set of category names, from a COCO instances file (annotations/instances_<split>.json)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {c["id"]: c["name"] for c in data["categories"]}
        objects = {im["id"]: set() for im in data.get("images", [])}
        for a in data["annotations"]:
            objects.setdefault(a["image_id"], set()).add(names[a["category_id"]])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
    unknown = sorted(set(names.values()) - set(SYNONYMS))
    if unknown:
        raise ValueError(f"{path}: categories with no words to find them by: {', '.join(unknown)}")
    return objects


def truth(instances: Mapping, references: Mapping[object, Sequence[str]]) -> dict:
    """image id -> the categories it holds: its instance annotations' and those its reference captions name."""
    return {i: set(instances.get(i, ())) | {c for ref in refs for c in mentions(ref)} for i, refs in references.items()}


def chair(captions: Mapping, objects: Mapping) -> dict:
    """CHAIR_i, CHAIR_s and their counts for captions[i] against objects[i] (the truth of image i).

    Also reports the mean caption length in words (CHAIR grows with it) and object recall: the share of
    annotated categories the captions name. Rates with nothing to measure are nan.
    """
    missing = [i for i in captions if i not in objects]
    if missing:
        raise ValueError(f"chair: no truth for {len(missing)} captioned images (e.g. {missing[0]!r})")
    named = hallucinated = hallucinating = words = truths = recalled = 0
    for i, caption in captions.items():
        said = mentions(caption)
        wrong = [c for c in said if c not in objects[i]]
        named, hallucinated, hallucinating = named + len(said), hallucinated + len(wrong), hallucinating + bool(wrong)
        words += len(WORD.findall(caption.lower()))
        truths, recalled = truths + len(objects[i]), recalled + len(set(said) & set(objects[i]))
    n = len(captions)
    nan = float("nan")
    return {
        "coco_chair_i": hallucinated / named if named else nan,
        "coco_chair_s": hallucinating / n if n else nan,
        "coco_object_recall": recalled / truths if truths else nan,
        "coco_mean_words": words / n if n else nan,
        "coco_mentions": named,
        "coco_hallucinated": hallucinated,
    }


def human_chair(references: Mapping[object, Sequence[str]], instances: Mapping) -> dict:
    """CHAIR of the humans: each reference caption against the truth its image has without it (the instances
    and the other references), averaged over which reference is left out. A floor the models are measured by."""
    runs = []
    for k in range(min((len(r) for r in references.values()), default=0)):
        held = {i: refs[k] for i, refs in references.items()}
        rest = {i: [r for j, r in enumerate(refs) if j != k] for i, refs in references.items()}
        runs.append(chair(held, truth(instances, rest)))
    return {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]} if runs else {}
