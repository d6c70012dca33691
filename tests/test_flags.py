"""Every flag fed a value that cannot work stops the command with one line naming the flag, before any work."""

import contextlib
import dataclasses
import io
import math
import subprocess
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nanovlm import bench, config, pipeline
from nanovlm.__main__ import main
from nanovlm.decoder import DecoderConfig
from nanovlm.projector import ProjectorConfig
from nanovlm.vit import ViTConfig

SCENES = config.get_preset("scenes")
FIELDS = config.override_fields(SCENES)
INT_FLAGS = sorted(f for f, (obj, attr) in FIELDS.items() if type(getattr(obj, attr)) is int)
FLOAT_FLAGS = sorted(f for f, (obj, attr) in FIELDS.items() if type(getattr(obj, attr)) is float)

# the smallest value of each integer setting that can work; the rest start at 1
INT_MINIMUM = dict.fromkeys(INT_FLAGS, 1) | {"warmup-steps": 0, "seed": 0, "max-text-len": 2, "vocab-size": 260}
CHOICES = {
    "stage": set(config.STAGES),
    "optimizer": {"adamw", "muon"},
    "dtype": {"auto", "fp32", "bf16"},
    "compile": {"auto", "on", "off"},
    "kind": {"scenes", "coco"},
}
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NEGATIVE = st.floats(max_value=-math.ulp(0.0))  # -inf included


def parses(kind: type, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def not_a(kind: type) -> st.SearchStrategy[str]:
    """Text that int() (or float()) cannot read: words, decimals for integers, empty strings, odd characters."""
    typical = ["", "ten", "1.5", "1e3", "nan", "inf", "0x10", "1,2", "--", "None"]
    return st.one_of(st.sampled_from(typical), st.text(max_size=8)).filter(lambda t: not parses(kind, t))


def rejected(values: dict[str, str]) -> str:
    """The message of the ValueError that apply_overrides raises for these flags; it must be one line."""
    with pytest.raises(ValueError) as e:
        config.apply_overrides(SCENES, values)
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    return message


def rejected_naming(flag: str, text: str) -> str:
    message = rejected({flag: text})
    assert message.startswith(f"--{flag} "), message
    return message


def test_the_tables_above_cover_every_numeric_setting():
    # a new setting needs its minimum here, so the properties below cover it
    assert set(INT_MINIMUM) == set(INT_FLAGS) and "lr" in FLOAT_FLAGS and "betas" in FIELDS
    assert set(CHOICES) <= set(FIELDS)


@settings(max_examples=150, deadline=None)
@given(flag=st.sampled_from(INT_FLAGS), data=st.data())
def test_an_integer_setting_below_its_minimum_is_rejected_naming_the_flag(flag, data):
    value = data.draw(st.integers(min_value=-(2**70), max_value=INT_MINIMUM[flag] - 1))
    rejected_naming(flag, str(value))


@settings(max_examples=100, deadline=None)
@given(flag=st.sampled_from(FLOAT_FLAGS), value=st.one_of(NON_FINITE, NEGATIVE))
def test_a_float_setting_that_is_negative_or_not_finite_is_rejected_naming_the_flag(flag, value):
    rejected_naming(flag, repr(value))


@settings(max_examples=30, deadline=None)
@given(lr=st.sampled_from([0.0, -0.0]), prob=st.floats(min_value=1.0, exclude_min=True))
def test_a_zero_learning_rate_and_a_probability_above_one_are_rejected(lr, prob):
    assert "lr" in rejected_naming("lr", repr(lr))
    assert "first_caption_prob" in rejected_naming("first-caption-prob", repr(prob))


@settings(max_examples=100, deadline=None)
@given(flag=st.sampled_from(INT_FLAGS + FLOAT_FLAGS), data=st.data())
def test_a_numeric_setting_given_text_it_cannot_read_is_rejected_naming_the_flag(flag, data):
    kind = int if flag in INT_FLAGS else float
    assert "expected a" in rejected_naming(flag, data.draw(not_a(kind)))


UNIT = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)
OUT_OF_UNIT = st.one_of(NEGATIVE, st.floats(min_value=1.0), NON_FINITE)


@settings(max_examples=100, deadline=None)
@given(
    betas=st.one_of(
        st.lists(UNIT, max_size=4).filter(lambda b: len(b) != 2),
        st.tuples(UNIT, OUT_OF_UNIT),
        st.tuples(OUT_OF_UNIT, UNIT),
    )
)
def test_betas_must_be_two_numbers_in_zero_one(betas):
    assert "betas" in rejected_naming("betas", ",".join(map(repr, betas)))


@settings(max_examples=100, deadline=None)
@given(flag=st.sampled_from(sorted(CHOICES)), text=st.text(max_size=10))
def test_a_named_choice_rejects_any_other_word_naming_the_flag(flag, text):
    assume(text not in CHOICES[flag])
    rejected_naming(flag, text)


ANY_TEXT = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(repr),
    st.lists(st.floats().map(repr), max_size=3).map(",".join),
    st.text(max_size=10),
)


@settings(max_examples=300, deadline=None)
@given(flag=st.sampled_from(sorted(FIELDS)), text=ANY_TEXT)
def test_any_value_of_any_setting_is_accepted_or_rejected_in_one_line_naming_the_flag(flag, text):
    try:
        config.apply_overrides(SCENES, {flag: text})
    except ValueError as e:
        assert str(e).startswith(f"--{flag} ") and len(str(e).splitlines()) == 1, str(e)


@pytest.mark.parametrize(
    "flag, text",
    [
        ("max-steps", "1"),
        ("batch-size", "1"),
        ("grad-accum", "1"),
        ("warmup-steps", "0"),
        ("eval-every", "1"),
        ("eval-batches", "1"),
        ("log-every", "1"),
        ("seed", "0"),
        ("seed", str(2**64 - 1)),
        ("lr", "1e-9"),
        ("min-lr", "0"),
        ("weight-decay", "0"),
        ("grad-clip", "0"),
        ("first-caption-prob", "0"),
        ("first-caption-prob", "1"),
        ("betas", "0,0"),
        ("betas", "0.9,0.999999"),
        ("image-size", "16"),
        ("vocab-size", "260"),
        ("max-text-len", "2"),
        ("n-train", "1"),
        ("vit-patch-size", "1"),
        ("vit-dim", "1"),
        ("vit-n-heads", "1"),
        ("vit-n-layers", "1"),
        ("vit-mlp-ratio", "1"),
        ("vit-channels", "3"),
        ("vit-image-size", "64"),
        ("projector-in-dim", "64"),
        ("projector-out-dim", "128"),
        ("projector-pixel-shuffle", "1"),
        ("projector-hidden-mult", "1"),
        ("decoder-dim", "4"),
        ("decoder-n-heads", "1"),
        ("decoder-n-layers", "1"),
        ("decoder-mlp-ratio", "1"),
        ("decoder-max-seq-len", "68"),
        ("decoder-vocab-size", "512"),
        ("device", "cpu"),
        ("dtype", "fp32"),
        ("compile", "off"),
        ("stage", "text"),
        ("train", "projector"),
        ("kind", "coco"),
        ("data", "elsewhere"),
        ("out", "runs/elsewhere"),
    ],
)
def test_the_edge_values_that_can_work_are_accepted(flag, text):
    run = config.apply_overrides(SCENES, {flag: text})
    obj, attr = config.override_fields(run)[flag]
    assert getattr(obj, attr) == config._convert(text, getattr(obj, attr), flag)


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_every_preset_builds_and_passes_its_own_checks_unchanged(name):
    assert config.apply_overrides(config.get_preset(name), {}) == config.get_preset(name)


def test_settings_are_checked_together_after_all_are_set():
    # 128 px patches are fine once the images are 128 px, whichever flag comes first
    run = config.apply_overrides(SCENES, {"vit-patch-size": "128", "image-size": "128", "projector-pixel-shuffle": "1"})
    assert run.model.n_image_tokens == 1


def test_a_clash_between_settings_names_only_the_flags_involved():
    message = rejected({"decoder-n-layers": "2", "vit-dim": "96", "vit-n-heads": "5"})
    assert message.startswith("--vit-dim 96 --vit-n-heads 5: ") and "decoder" not in message
    message = rejected({"projector-pixel-shuffle": "3"})
    assert message.startswith("--projector-pixel-shuffle 3: ") and "patch grid" in message
    message = rejected({"vit-n-heads": "0", "decoder-n-heads": "0"})
    assert message.startswith("--vit-n-heads 0: ")


def test_a_setting_that_another_one_decides_may_only_repeat_its_value():
    assert "--vit-dim" in rejected_naming("projector-in-dim", "32")
    assert "--image-size" in rejected_naming("vit-image-size", "32")
    assert "RGB" in rejected_naming("vit-channels", "1")


def never_called(*args, **kwargs):
    raise AssertionError("the command started its work: a bad flag was not stopped")


def cli_error(argv: list[str]) -> list[str]:
    """Run the CLI in this process; it must exit with code 2 and no traceback. Returns the stderr lines.

    The functions that do a command's work (draw scenes, train, benchmark) are replaced by one that fails
    the test, so a flag that is not checked cannot start them.
    """
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for module, name in ((pipeline, "run"), (pipeline, "prepare_splits"), (bench, "run")):
            mp.setattr(module, name, never_called)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            with pytest.raises(SystemExit) as e:
                main(argv)
    assert e.value.code == 2 and "Traceback" not in err.getvalue(), err.getvalue()
    return err.getvalue().strip().splitlines()


def assert_names_flag(lines: list[str], flag: str) -> None:
    """Our own errors are one line `error: --flag ...`; argparse's end with `error: argument --flag: ...`."""
    if lines[0].startswith("usage:"):
        assert f"error: argument {flag}" in lines[-1], lines
    else:
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), lines


CAPTION = ["caption", "picture.png", "--ckpt", "nowhere"]
# command line before the flag, the flag, its smallest value that can work
CLI_INTS = [
    (["eval", "--ckpt", "nowhere"], "--limit", 1),
    (CAPTION, "--top-k", 1),
    (CAPTION, "--seed", 0),
    (["data", "scenes"], "--image-size", 1),
    (["data", "scenes"], "--n-train", 1),
    (["bench", "train"], "--threads", 1),
    (["bench", "train"], "--batch-size", 1),
    (["bench", "train"], "--steps", 1),
    (["bench", "train"], "--warmup", 0),
    (["bench", "generate"], "--new-tokens", 1),
    (["bench", "generate"], "--repeats", 1),
    (["bench", "data"], "--batches", 1),
]


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CLI_INTS), data=st.data())
def test_an_integer_flag_of_the_other_commands_below_its_minimum_or_not_an_integer_stops_the_command(case, data):
    before, flag, low = case
    # argparse drops a lone "--" (its end-of-options marker) even after "=", so that is no value to test
    text = data.draw(st.one_of(st.integers(max_value=low - 1).map(str), not_a(int)).filter(lambda t: t != "--"))
    assert_names_flag(cli_error([*before, f"{flag}={text}"]), flag)


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(
        [
            ("--temperature", st.one_of(NON_FINITE, NEGATIVE).map(repr)),
            (
                "--top-p",
                st.one_of(NON_FINITE, NEGATIVE, st.just(0.0), st.floats(min_value=1, exclude_min=True)).map(repr),
            ),
            ("--temperature", not_a(float).filter(lambda t: t != "--")),
            ("--top-p", not_a(float).filter(lambda t: t != "--")),
        ]
    ),
    data=st.data(),
)
def test_a_sampling_flag_of_caption_out_of_range_stops_the_command(case, data):
    flag, values = case
    assert_names_flag(cli_error([*CAPTION, f"{flag}={data.draw(values)}"]), flag)


@pytest.mark.parametrize(
    "argv, flag",
    [
        ([*CAPTION, "--device", "gpu"], "--device"),
        ([*CAPTION, "--device", "auto"], "--device"),
        ([*CAPTION, "--device", "cuda:99"], "--device"),
        (["eval", "--ckpt", "nowhere", "--device", "cuda:abc"], "--device"),
        (["bench", "peak", "--device", ""], "--device"),
        (["bench", "generate", "--batch-sizes", "0,64"], "--batch-sizes"),
        (["bench", "generate", "--batch-sizes", ","], "--batch-sizes"),
        (["bench", "all", "--batch-sizes", "one"], "--batch-sizes"),
        (["train", "--lr", "-inf"], "--lr"),
        (["train", "--lr=-inf"], "--lr"),
        (["train", "--seed", "-1"], "--seed"),
        (["train", "--device", "gpu"], "--device"),
        (["train", "--device", "cuda:99"], "--device"),
        (["train", "--vocab-size", "100"], "--vocab-size"),
        (["train", "--out", ""], "--out"),
        (["train", "--data", ""], "--data"),
    ],
)
def test_other_bad_values_stop_the_command_naming_the_flag(argv, flag):
    assert_names_flag(cli_error(argv), flag)


def test_a_directory_given_as_an_image_is_called_a_directory(tmp_path):
    (lines,) = cli_error(["caption", str(tmp_path), "--ckpt", str(tmp_path / "nowhere")])
    assert lines == f"error: {tmp_path} is a directory, not an image file; name the image files in it"


def test_train_help_still_lists_every_setting():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and all(f"--{flag} " in out.getvalue() for flag in FIELDS)


@pytest.mark.parametrize("component", [ViTConfig, ProjectorConfig, DecoderConfig])
def test_every_component_field_has_a_help_line(component):
    assert set(config.COMPONENT_HELP[component]) == {f.name for f in dataclasses.fields(component)}


def test_finalize_sets_every_derived_field_from_the_fields_it_follows():
    run = config.get_preset("tiny")
    run.data.image_size, run.model.vit.dim, run.model.decoder.dim = 32, 64, 96
    m = run.finalize(vocab_size=300).model
    assert (m.vit.image_size, m.projector.in_dim, m.projector.out_dim, m.decoder.vocab_size) == (32, 64, 96, 300)
    assert m.decoder.max_seq_len == m.n_image_tokens + run.data.max_text_len


# a COCO folder that is not there: should a check be missing, training stops at once instead of drawing scenes
NO_DATA = ["--kind", "coco", "--data", "absent"]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["train", "--vit-n-heads", "0", *NO_DATA], "--vit-n-heads"),
        (["train", "--betas", "0.9", *NO_DATA], "--betas"),
        (["train", "--lr", "inf", *NO_DATA], "--lr"),
        (["train", "--decoder-n-layers", "0", *NO_DATA], "--decoder-n-layers"),
        (["eval", "--ckpt", "nowhere", "--limit", "-3"], "--limit"),
        (["caption", "pictures", "--ckpt", "nowhere"], None),
    ],
)
def test_the_real_command_exits_with_code_2_and_one_line_before_doing_any_work(tmp_path, args, flag):
    (tmp_path / "pictures").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "nanovlm", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    if flag is None:
        assert lines == ["error: pictures is a directory, not an image file; name the image files in it"]
    else:
        assert_names_flag(lines, flag)
    assert [p.name for p in tmp_path.iterdir()] == ["pictures"]  # no data drawn, no run started


def test_evaluate_split_refuses_a_limit_below_one():
    from nanovlm.evaluate import evaluate_split

    with pytest.raises(ValueError, match="limit -3: score at least 1 image"):
        evaluate_split(None, None, None, limit=-3)  # checked before the model or the split is touched


def test_caption_reads_the_images_before_loading_the_model():
    (line,) = cli_error(["caption", "missing.png", "--ckpt", "nowhere"])
    assert "missing.png" in line and "nowhere" not in line
