"""open_clip's "No pretrained weights loaded" record is dropped where leanclip builds random weights on purpose
(leanclip.models.openclip.random_init), and only that record: other log lines pass, and the filter goes away after."""
import logging

import open_clip
import torch

from leanclip.configs import register_tiny_config
from leanclip.models.openclip import random_init

NOTICE = "No pretrained weights loaded"


def _notices(caplog):
    return [r for r in caplog.records if NOTICE in r.getMessage()]


def test_random_init_drops_only_the_no_weights_notice(caplog):
    name = register_tiny_config()
    with caplog.at_level(logging.WARNING):
        open_clip.create_model(name, pretrained=None)
        assert len(_notices(caplog)) == 1  # open_clip's own behaviour: what the filter is for
        caplog.clear()
        with random_init():
            open_clip.create_model(name, pretrained=None)
            logging.warning("another root warning")
            logging.getLogger("open_clip.factory").warning("another open_clip warning")
        assert _notices(caplog) == []
        assert {r.getMessage() for r in caplog.records} >= {"another root warning", "another open_clip warning"}
        caplog.clear()
        open_clip.create_model(name, pretrained=None)  # outside the context: open_clip as it is
        assert len(_notices(caplog)) == 1


def test_bench_step_models_build_without_the_notice(caplog):
    from leanclip.bench.step import make_step

    name = register_tiny_config()
    tok = open_clip.get_tokenizer("ViT-B-16")
    with caplog.at_level(logging.WARNING):
        for mode in ("plain", "lean:none"):
            make_step(name, "ln", mode, batch_size=2, n_classes=3, device=torch.device("cpu"), tokenizer=tok)
    assert _notices(caplog) == []
