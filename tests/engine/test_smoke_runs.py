"""Smoke runs (no --data, no --pretrained, the default tiny model) start from the synthetic pre-training cached per
user: far above chance, the same run after run, recorded in the checkpoint and rebuilt from it by eval; --pretrain-steps
0 keeps the random init, and eval of such a run does not put the default back. The cache holds exactly what the same
pre-training gives in process, whatever the caller's thread count."""
import json

import torch
from safetensors.torch import load_file

from leanclip import cli, weights
from leanclip.cli.common import SMOKE_PRETRAIN_STEPS, pretrain_synthetic, read_checkpoint_meta, run_record
from tests.engine.cli_checks import last_json, run


def _data(synth_dir):
    return ["--synthetic-classes", 4, "--synthetic-dir", synth_dir, "--no-progress", "--threads", 1]


def test_the_cache_holds_the_in_process_pretraining(tmp_path, tiny_name, tok):
    path = cli.synthetic_pretrained_weights(tmp_path / "a", tiny_name, 3)
    assert cli.synthetic_pretrained_weights(tmp_path / "a", tiny_name, 3) == path  # made once
    model = weights.create_model(tiny_name, None, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    pretrain_synthetic(model, tok, 3, int(model.visual.image_size[0]), seed=0)
    cached = load_file(path)
    assert cached.keys() == model.state_dict().keys()
    assert all(torch.equal(cached[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(cached["visual.ln_post.bias"], start["visual.ln_post.bias"])  # trained, not the init
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # made on one thread: a caller with other settings gets the same file
        other = cli.synthetic_pretrained_weights(tmp_path / "b", tiny_name, 3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert open(other, "rb").read() == open(path, "rb").read()


def test_smoke_train_eval_zeroshot_start_from_the_cached_pretraining(capsys, tmp_path, synth_dir, tiny_name):
    train = ["train", "--method", "ln", "--shots", 2, "--epochs", 1, *_data(synth_dir)]
    rc, out, err = run(capsys, *train, "--output", tmp_path / "a")
    assert rc == 0, err
    first = last_json(out)
    acc = first["metrics"]["test"]["top1"]
    assert acc > 60  # 4 classes: chance is 25; the random init stays there
    record = run_record(read_checkpoint_meta(tmp_path / "a"))
    assert record["pretrain_steps"] == SMOKE_PRETRAIN_STEPS and record["weights"] is None
    rc, out, err = run(capsys, *train, "--output", tmp_path / "b")  # the same run again: the same numbers
    assert rc == 0, err
    again = last_json(out)
    assert (again["metrics"], again["final_train_loss"]) == (first["metrics"], first["final_train_loss"])
    rc, out, err = run(capsys, "eval", "--checkpoint", tmp_path / "a", *_data(synth_dir))  # rebuilt from the record
    assert rc == 0, err
    assert last_json(out)["top1"] == acc
    rc, out, err = run(capsys, "zeroshot", *_data(synth_dir))
    assert rc == 0 and last_json(out)["top1"] > 60, err
    # the same weights as naming the cached file
    named = cli.synthetic_pretrained_weights(None, tiny_name, SMOKE_PRETRAIN_STEPS)
    rc, out, err = run(capsys, *train, "--pretrained", named, "--pretrain-steps", 0, "--output", tmp_path / "c")
    assert rc == 0 and last_json(out)["metrics"] == first["metrics"], err


def test_pretrain_steps_0_keeps_the_random_init_and_eval_keeps_it_too(capsys, tmp_path, synth_dir):
    rc, out, err = run(capsys, "train", "--method", "ln", "--shots", 2, "--epochs", 1, "--pretrain-steps", 0,
                       "--output", tmp_path, *_data(synth_dir))
    assert rc == 0, err
    acc = last_json(out)["metrics"]["test"]["top1"]
    assert run_record(read_checkpoint_meta(tmp_path))["pretrain_steps"] == 0
    rc, out, err = run(capsys, "eval", "--checkpoint", tmp_path, *_data(synth_dir))
    assert rc == 0, err
    assert last_json(out)["top1"] == acc  # not the smoke default: the model the run trained
    assert acc < 50


def test_smoke_episodes_are_above_chance(capsys, synth_dir):
    rc, out, err = run(capsys, "episodes", "--ways", 4, "--episodes", 10, *_data(synth_dir))
    assert rc == 0, err
    res = last_json(out)
    assert res["classifiers"]["text"]["mean"] > 50  # 4 ways: chance is 25


def test_runs_with_data_or_weights_keep_their_model(capsys, tmp_path):
    """The default applies to smoke runs only: a split file or another model is built as it is (recorded 0)."""
    from leanclip import synthetic

    split = synthetic.write_split_file(tmp_path / "toy", synthetic.make_classes(3, seed=1), 2, 1, 2, size=16,
                                       name="Toy")
    rc, out, err = run(capsys, "train", "--method", "ln", "--shots", 1, "--epochs", 1, "--split-file", split,
                       "--no-progress", "--threads", 1, "--output", tmp_path / "run")
    assert rc == 0, err
    assert run_record(read_checkpoint_meta(tmp_path / "run"))["pretrain_steps"] == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["command"] == "train"
