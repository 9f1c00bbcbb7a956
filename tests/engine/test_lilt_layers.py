"""``lilt-ln`` with LayerNorms unlocked by layer range (LilT's Fig. 5: ``image_layers`` / ``text_layers``): the
grammar, the trainable names against the range on tiny models (exactly), the depth check, and the command line
(recorded in the checkpoint and result.json, re-applied by eval; a bad range exits 2 with one line)."""
import copy
import json
import warnings

import pytest

from leanclip import cli
from leanclip.cli.common import read_checkpoint_meta
from leanclip.configs import register_tiny_config
from leanclip.layer_ranges import parse_layers, tower_block_names
from leanclip.methods import lilt, prepare
from tests.engine.cli_checks import run as _run

L4 = "leanclip-tiny-L4"
ALWAYS = {"visual.proj", "text_projection", "lilt_temperature.temp"}  # the projections and the temperature


@pytest.fixture(scope="module")
def deep():
    import open_clip

    register_tiny_config(L4, vision_cfg={"layers": 4}, text_cfg={"layers": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(L4, pretrained=None)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _block_lns(prefix, blocks):
    return {f"{prefix}transformer.resblocks.{i}.{ln}.{leaf}" for i in blocks for ln in ("ln_1", "ln_2")
            for leaf in ("weight", "bias")}


@pytest.mark.parametrize("spec,want", [
    ("6-11", (6, 7, 8, 9, 10, 11)), ("3", (3,)), ("0-2,5", (0, 1, 2, 5)), (" 4 , 1-2 ", (1, 2, 4)), (7, (7,)),
    ([3, 1], (1, 3)), ("0-0", (0,)),
])
def test_parse_layers(spec, want):
    assert parse_layers(spec, "image_layers") == want


@pytest.mark.parametrize("spec,needle", [
    ("", "block range"), ("a", "'a' is not a block index"), ("3-1", "runs backwards"), ("1,1", "block 1 is named twice"),
    ("0-2,2", "block 2 is named twice"), ("-1", "'-1' is not"), (True, "block range"), (1.5, "block range"),
    ("1-", "'1-' is not"),
])
def test_parse_layers_refuses(spec, needle):
    with pytest.raises(ValueError, match="text_layers") as e:
        parse_layers(spec, "text_layers")
    assert needle in str(e.value)


@pytest.mark.parametrize("image,text", [("2-3", "0-1"), ("0-1", "2-3")])  # pattern A (top image, bottom text), B
def test_trainable_names_match_the_ranges_exactly(deep, image, text):
    m = prepare(copy.deepcopy(deep), "lilt-ln", image_layers=image, text_layers=text)
    want = _block_lns("visual.", parse_layers(image, "i")) | _block_lns("", parse_layers(text, "t")) | ALWAYS
    assert _trainable(m) == want  # ln_pre, ln_post and ln_final lie outside every block: locked


def test_one_tower_ranged_other_tower_whole(deep):
    m = prepare(copy.deepcopy(deep), "lilt-ln", image_layers="1,3")
    text_lns = {n for n in _trainable(prepare(copy.deepcopy(deep), "lilt-ln")) if not n.startswith("visual.")}
    assert _trainable(m) == _block_lns("visual.", (1, 3)) | text_lns | {"visual.proj"}
    assert "ln_final.weight" in text_lns
    everything = prepare(copy.deepcopy(deep), "lilt-ln", image_layers="all", text_layers="all")  # the default
    assert _trainable(everything) == _trainable(prepare(copy.deepcopy(deep), "lilt-ln"))
    full = prepare(copy.deepcopy(deep), "lilt-ln", image_layers="0-3", text_layers="0-3")
    assert _trainable(full) == _trainable(prepare(copy.deepcopy(deep), "lilt-ln")) - {
        "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
        "ln_final.weight", "ln_final.bias"}


@pytest.mark.parametrize("opts,needle", [
    ({"image_layers": "2-4"}, "image_layers=2-4: the image tower has 4 blocks (0-3), so block 4 does not exist"),
    ({"text_layers": 9}, "text_layers=9: the text tower has 4 blocks (0-3)"),
    ({"tower": "image", "text_layers": "0"}, "text_layers: method 'lilt-ln' with tower=image leaves the text tower"),
    ({"image_layers": "x"}, "image_layers=x"),
])
def test_bad_ranges_refused_before_any_change(deep, opts, needle):
    m = copy.deepcopy(deep)
    before = _trainable(m)
    with pytest.raises(ValueError) as e:
        prepare(m, "lilt-ln", **opts)
    assert needle in str(e.value) and _trainable(m) == before and not hasattr(m, "lilt_temperature")


def test_timm_image_tower_numbers_its_trunk_blocks():
    pytest.importorskip("timm")
    import open_clip

    from leanclip.configs import register_tiny_timm_config

    name = register_tiny_timm_config("eva02")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = open_clip.create_model(name, pretrained=None)
    blocks = tower_block_names(m, "image")
    assert blocks and all(b == f"visual.trunk.blocks.{i}" for i, b in enumerate(blocks))
    prepare(m, "lilt-ln", image_layers=str(len(blocks) - 1))
    image = {n for n in _trainable(m) if n.startswith("visual.")} - set(lilt.projection_names(m, "image"))
    assert image and all(n.startswith(f"{blocks[-1]}.") for n in image)


def test_cli_records_and_eval_reapplies(capsys, tmp_path):
    small = ["--synthetic-eval-pairs", 16, "--no-progress", "--threads", 1]
    rc, out, err = _run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--opt", "image_layers=1",
                        "--opt", "text_layers=0", "--epochs", 1, "--batch-size", 16, "--synthetic-pairs", 32,
                        "--output", tmp_path, *small)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["options"] == {"image_layers": "1", "text_layers": "0"}
    assert json.loads((tmp_path / "result.json").read_text())["options"] == res["options"]
    opts = read_checkpoint_meta(tmp_path)["options"]
    assert (opts["image_layers"], opts["text_layers"]) == ("1", "0")
    # 2 blocks per tower on the tiny model: 2 LayerNorms x (weight, bias) x width 64 per tower, + both projections
    # (64 x 64) and the temperature
    assert res["trainable"] == 2 * (2 * 2 * 64) + 2 * 64 * 64 + 1
    rc, out, err = _run(capsys, "eval", "--task", "retrieval", "--checkpoint", tmp_path, *small)
    assert rc == 0, err  # the strict load refuses a model prepared with other trainable parameters


def test_cli_out_of_depth_exit_2_one_line(capsys, tmp_path):
    rc, out, err = _run(capsys, "train", "--task", "contrastive", "--method", "lilt-ln", "--opt", "image_layers=6-11",
                        "--epochs", 1, "--synthetic-pairs", 32, "--output", tmp_path / "run", "--no-progress")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "image_layers=6-11" in err and "2 blocks (0-1)" in err
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
