"""``leanclip bench step`` on a ``transformers:`` model built from its config with random weights (no download): every
mode builds and steps (the tower's own gradient checkpointing is ``transformers``' ``gradient_checkpointing_enable``),
and each eager mode carries the step-peak estimate beside the measured peak."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from leanclip.bench import step  # noqa: E402
from leanclip.models import transformers as hf  # noqa: E402
from tests.engine.test_transformers_family import NAMES, _torch_backend, cache  # noqa: E402,F401  (fixtures)


@pytest.mark.parametrize("mode", ["plain", "plain+gc", "lean:mlp+qkv", "lean:block/1", "lean:budget:0.5"])
def test_step_modes_on_a_transformers_model(cache, mode):
    name = NAMES["clip"]
    tok = hf.get_tokenizer(step.create_random(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the budget's plan notice
        run, _, model = step.make_step(name, "ln", mode, batch_size=3, n_classes=3, device=torch.device("cpu"),
                                       tokenizer=tok, scope="image")
    assert hf.is_transformers(model)
    assert model.visual.model.encoder.gradient_checkpointing == (mode == "plain+gc")
    watched = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "visual." in n}
    for _ in range(2):
        assert torch.isfinite(run())
    moved = [n for n, p in model.named_parameters() if n in watched and not torch.equal(watched[n], p)]
    assert len(moved) >= len(watched) // 2, sorted(set(watched) - set(moved))  # some moves are below fp32's step
    spec = step.parse_mode(mode)
    predicted = step.predicted_peak(model, spec, batch_size=3, n_classes=3, scope="image", precision="fp32")
    assert predicted is not None and predicted > 0


def test_random_transformers_model_needs_a_known_config(monkeypatch):
    with pytest.raises(ValueError, match="no built-in config for it"):
        hf.create_random("transformers:nobody/unknown-model")
    m = step.create_random("transformers:openai/clip-vit-base-patch16", device="meta")
    vis = m.visual.model
    assert vis.embeddings.patch_embedding.kernel_size == (16, 16) and len(vis.encoder.layers) == 12
    assert vis.encoder.layers[0].mlp.fc1.weight.is_meta


def test_largest_batch_is_the_brute_force_boundary():
    from leanclip.bench.estimate import largest_batch

    for edge in (0, 1, 2, 7, 64, 100):
        assert largest_batch(lambda b, e=edge: b <= e, 100) == edge
    assert largest_batch(lambda b: True, 37) == 37


@pytest.mark.parametrize("family", ["eva02", "vit-map"])
def test_fit_estimate_prints_estimates_per_mode(family, tmp_path, capsys):
    """``bench fit --estimate``: nothing runs; per mode the estimator's largest batch, which grows with the cap, is
    larger with the tower's checkpointing than plain and at least plain's under a lean plan; the JSON says it is an
    estimate."""
    import json

    from leanclip.cli import main
    from leanclip.configs import register_tiny_timm_config

    name = register_tiny_timm_config(family)
    rc = main(["bench", "fit", "--estimate", "--model", name, "--method", "ln", "--scope", "image",
               "--mem-cap", "20MB,40MB", "--max-batch", "4096", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("ESTIMATES (nothing was run)")
    res = json.loads(open(out.strip().splitlines()[-1].split("wrote ")[1]).read())
    assert res["kind"] == "estimate"
    got = {m: [r["largest_batch"] for r in res["results"][m].values()] for m in ("plain", "plain+gc", "lean:fit")}
    assert all(0 < a < b for a, b in got.values()), got
    assert got["lean:fit"][1] >= got["plain"][1] and got["plain+gc"][1] > got["plain"][1], got


def test_fit_estimate_refuses_modes_it_does_not_cover(tmp_path, capsys):
    from leanclip.cli import main

    rc = main(["bench", "fit", "--estimate", "--model", "ViT-B-16", "--modes", "lean:block", "--output",
               str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--estimate covers plain, plain+gc, lean:fit" in err and len(err.strip().splitlines()) == 1
