"""--preset lilt (LilT's recipe for --task contrastive) and ALBEF's colour-free RandAugment."""
import json

import pytest
import torch
from cli_checks import last_json, run
from torchvision import tv_tensors

from leanclip import albef_augment
from leanclip.albef_augment import ALBEF_OPS, AlbefRandAugment
from leanclip.data import clip_transform

TRAIN = ("train", "--task", "contrastive", "--method", "lilt-ln", "--synthetic-pairs", 16, "--no-initial-eval",
         "--synthetic-eval-pairs", 8, "--threads", 1, "--no-progress")


def test_preset_lilt_fills_the_recipe_explicit_flags_win_and_the_run_records_it(capsys, tmp_path):
    rc, out, err = run(capsys, *TRAIN, "--preset", "lilt", "--epochs", 1, "--batch-size", 8, "--image-size", 32,
                       "--output", tmp_path)
    assert rc == 0, err
    res = last_json(out)
    assert res["preset"] == "lilt" and res["epochs"] == 1 and res["batch_size"] == 8
    assert res["recipe"] == {"lr": 1e-4, "weight_decay": 0.02, "warmup_epochs": 1, "min_lr": 1e-5, "epochs": 1,
                             "batch_size": 8, "image_size": 32, "randaugment": "albef"}
    assert res["warmup_steps"] == 2  # one epoch of 16 pairs at batch 8
    summary = json.loads((tmp_path / "summary.json").read_text())
    cfg = summary.get("config", summary)
    assert cfg["randaugment"] == "albef" and cfg["augment"] and cfg["lr"] == 1e-4 and cfg["min_lr"] == 1e-5
    assert cfg["extra"]["preset"] == "lilt" and cfg["warmup_steps"] == 2
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert lrs[0] == pytest.approx(5e-5)  # linear warm-up: step 1 of 2 to the peak 1e-4


def test_preset_without_flags_sets_the_papers_values(capsys, tmp_path):
    """The defaults it fills (checked before the model is built: 15 epochs at batch 512 would not run here)."""
    from leanclip.cli import build_parser
    from leanclip.cli.contrastive import apply_preset

    args = build_parser("train").parse_args(["train", "--task", "contrastive", "--preset", "lilt", "--lr", "3e-4"])
    recipe = apply_preset(args)
    assert recipe == {"lr": 3e-4, "weight_decay": 0.02, "warmup_epochs": 1, "min_lr": 1e-5, "epochs": 15,
                      "batch_size": 512, "image_size": 256, "randaugment": "albef"}
    args = build_parser("train").parse_args(["train", "--task", "contrastive", "--preset", "lilt",
                                             "--warmup-steps", "5"])
    assert apply_preset(args)["warmup_epochs"] is None  # a warm-up in steps replaces the preset's


def test_warmup_epochs_and_steps_together_is_a_usage_error(capsys, tmp_path):
    rc, _, err = run(capsys, *TRAIN, "--warmup-epochs", 1, "--warmup-steps", 2, "--batch-size", 8,
                     "--output", tmp_path / "x")
    assert rc == 2 and "give one" in err and not (tmp_path / "x").exists()


def test_albef_randaugment_draws_n_ops_from_its_list_each_with_probability_half(monkeypatch):
    calls = []
    monkeypatch.setattr(albef_augment, "_apply", lambda img, op, level: calls.append((op, level)) or img)
    torch.manual_seed(0)
    aug = AlbefRandAugment(2, 7)
    for _ in range(400):
        aug(torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert {op for op, _ in calls} == set(ALBEF_OPS) and {lv for _, lv in calls} == {7.0}
    assert 340 < len(calls) < 460  # 800 draws, each applied with probability 1/2
    assert not {"Color", "Contrast", "Posterize", "Solarize", "Hue"} & set(ALBEF_OPS)


@pytest.mark.parametrize("op", ALBEF_OPS)
def test_each_albef_op_keeps_a_uint8_image(op):
    torch.manual_seed(1)
    img = tv_tensors.Image(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
    out = albef_augment._apply(img, op, 7.0)
    assert out.shape == img.shape and out.dtype == torch.uint8
    assert torch.equal(out, img) == (op == "Identity") or op in ("AutoContrast", "Equalize")


def test_clip_transform_albef_and_bad_kind():
    tf = clip_transform(16, train=True, randaugment="albef")
    assert any(isinstance(t, AlbefRandAugment) for t in tf.transforms)
    assert tf(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)).shape == (3, 16, 16)
    with pytest.raises(ValueError, match="albef"):
        clip_transform(16, train=True, randaugment="bogus")
