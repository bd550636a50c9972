"""The training core's small pieces against hand-derived values."""
import math

import pytest

from fcmae.training.config import RunConfig, build, parse_args
from fcmae.training.optim import lr_at


def test_schedules_by_hand():
    # warmup: linear from 0 over 10 steps
    assert lr_at(5, 110, 10, 2.0) == pytest.approx(1.0)
    # cosine: halfway through the decay the lr is the mean of lr and min_lr
    assert lr_at(60, 110, 10, 2.0, 0.2) == pytest.approx(1.1)
    assert lr_at(110, 110, 10, 2.0, 0.2) == pytest.approx(0.2)
    assert lr_at(35, 110, 10, 2.0) == pytest.approx(1.0 + math.cos(math.pi / 4))
    # poly, power 1: a straight line from lr to min_lr
    assert lr_at(35, 110, 10, 2.0, kind="poly") == pytest.approx(1.5)
    assert lr_at(110, 110, 10, 2.0, kind="poly") == 0.0
    # step: x0.1 at each milestone (Mask R-CNN 3x: epochs 27 and 33 of 36)
    assert [lr_at(s, 360, 10, 1.0, kind="step", milestones=(270, 330)) for s in (100, 270, 329, 330)] == \
        pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_list_fields_and_channel_checks():
    cfg = parse_args(RunConfig, ["--in-chans", "4", "--mean", "0.1, 0.2,0.3,0.4", "--std", "1,2,3,4"])
    assert cfg.mean == [0.1, 0.2, 0.3, 0.4] and cfg.std == [1.0, 2.0, 3.0, 4.0]
    cfg.validate()
    for values, message in ((dict(in_chans=4), "needs --mean"), (dict(in_chans=2, mean=[0.1], std=[1, 1]), "1 values"),
                            (dict(std=[1, 0, 1]), "positive"), (dict(channel_axis="middle"), "last or first"),
                            (dict(input_size=100), "multiple of 32"), (dict(model="convnextv2_ato"), "Did you mean")):
        with pytest.raises(ValueError, match=message):
            build(RunConfig, values).validate()
