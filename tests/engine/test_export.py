"""``leanclip.merge`` and ``leanclip export``: a run's trained parameters folded into a plain model whose outputs are
the run's; methods that add modules are refused by name, before any write."""
import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from leanclip import cli, methods
from leanclip.cli.common import build_recorded_model, prepare_from_checkpoint, read_checkpoint_meta
from leanclip.cli.parser import build_parser
from tests.engine.test_lean import CLASSNAMES


def _train(tmp_path, method, capsys):
    run = tmp_path / method
    rc = cli.main(["train", "--method", method, "--epochs", "1", "--shots", "2", "--pretrain-steps", "0",
                   "--no-progress", "--output", str(run)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    return run


def _restored(run, out):
    """The run's prepared model, rebuilt as ``eval`` and ``export`` rebuild it."""
    args = build_parser("export").parse_args(["export", str(run), "--output", str(out)])
    meta = read_checkpoint_meta(run)
    args.checkpoint = str(run)
    model, tok, _, _ = build_recorded_model(args, meta)
    prepare_from_checkpoint(model, meta, tok, args.model)
    return model.eval(), tok


@pytest.mark.parametrize("method", ["ln", "lora"])
def test_export_gives_a_plain_model_with_the_runs_outputs(method, tmp_path, capsys):
    run = _train(tmp_path, method, capsys)
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", str(run), "--output", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["method"] == method and printed["model_class"] == "CLIP"
    prepared, tok = _restored(run, tmp_path / "unused.safetensors")
    plain = open_clip.create_model(printed["model"], pretrained=None)
    plain.load_state_dict(load_file(out))  # strict: every key of open_clip's own model, nothing else
    plain.eval()
    torch.manual_seed(0)
    size = plain.visual.image_size
    images = torch.randn(3, 3, *(size if isinstance(size, tuple) else (size, size)))
    tokens = tok(CLASSNAMES)
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            got = getattr(plain, encode)(images if encode == "encode_image" else tokens)
            want = getattr(prepared, encode)(images if encode == "encode_image" else tokens)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), encode  # folded W + sBA: fp32 rounding


def test_export_refuses_a_method_that_adds_modules(tmp_path, capsys):
    run = _train(tmp_path, "coop", capsys)
    out = tmp_path / "model.safetensors"
    assert cli.main(["export", str(run), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "coop" in err and "no place" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("output,match", [("model.bin", "must end in .safetensors"), ("missing/m.safetensors",
                                                                                      "does not exist")])
def test_export_checks_its_output_first(output, match, tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "no-run"), "--output", str(tmp_path / output)]) == 2
    assert match in capsys.readouterr().err


def test_merge_names_what_it_cannot_fold(fresh_tiny, tokenizer):
    m = methods.prepare(fresh_tiny(), "ln+coop", classnames=CLASSNAMES, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"merge: method 'ln\+coop': coop adds modules"):
        methods.merge(m)
    with pytest.raises(ValueError, match="not prepared"):
        methods.merge(fresh_tiny())
    ln = methods.prepare(fresh_tiny(), "ln", lean=True)
    plain = methods.merge(ln)
    assert not hasattr(plain, "leanclip_info") and ln.leanclip_info["method"] == "ln"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(x), ln.encode_image(x), rtol=1e-5, atol=1e-6)
