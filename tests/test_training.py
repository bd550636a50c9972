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
    assert [lr_at(s, 360, 10, 1.0, kind="step", milestones=(270, 330)) for s in (100, 270, 329, 330)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01]
    )


def test_list_fields_and_channel_checks():
    cfg = parse_args(RunConfig, ["--in-chans", "4", "--mean", "0.1, 0.2,0.3,0.4", "--std", "1,2,3,4"])
    assert cfg.mean == [0.1, 0.2, 0.3, 0.4] and cfg.std == [1.0, 2.0, 3.0, 4.0]
    cfg.validate()
    for values, message in (
        (dict(in_chans=4), "needs --mean"),
        (dict(in_chans=2, mean=[0.1], std=[1, 1]), "1 values"),
        (dict(std=[1, 0, 1]), "positive"),
        (dict(channel_axis="middle"), "last or first"),
        (dict(input_size=100), "multiple of 32"),
        (dict(model="convnextv2_ato"), "Did you mean"),
    ):
        with pytest.raises(ValueError, match=message):
            build(RunConfig, values).validate()


def test_deprecated_flags_keep_their_old_meaning():
    from fcmae.tasks.detect.config import DetectConfig
    from fcmae.tasks.pretrain.config import PretrainConfig

    with pytest.warns(FutureWarning, match="--input-size is deprecated"):
        cfg = parse_args(DetectConfig, ["--input-size", "640"])
    assert (cfg.train_short_side, cfg.eval_short_side) == (640, 640)
    with pytest.warns(FutureWarning):
        cfg = parse_args(DetectConfig, ["--jitter", "lsj", "--input-size", "1024", "--eval-short-side", "800"])
    assert (cfg.crop_size, cfg.eval_short_side) == (1024, 800)
    with pytest.warns(FutureWarning, match="--split"):
        assert parse_args(PretrainConfig, ["--split", "unlabeled"]).train_split == "unlabeled"
    # the class carries the task's defaults: the Mask R-CNN 3x recipe
    assert (DetectConfig.lr, DetectConfig.epochs, DetectConfig.lr_milestones) == (1e-4, 36, [27, 33])


def test_config_layers_and_yaml_round_trip(tmp_path):
    import yaml

    from fcmae.tasks.classify.config import FinetuneConfig
    from fcmae.training.config import save_yaml

    (tmp_path / "a.yaml").write_text("lr: 0.5\nepochs: 7\noptim:\n  weight_decay: 0.01\n")
    cfg = parse_args(FinetuneConfig, ["--config", str(tmp_path / "a.yaml"), "--epochs", "3"])
    assert (cfg.lr, cfg.epochs, cfg.weight_decay) == (0.5, 3, 0.01)  # flag > file > default
    assert cfg.optim.weight_decay == cfg.weight_decay  # one field, two spellings
    save_yaml(cfg.to_dict(), tmp_path / "b.yaml")
    again = parse_args(FinetuneConfig, ["--config", str(tmp_path / "b.yaml")])
    assert again == cfg and again.to_dict() == yaml.safe_load((tmp_path / "b.yaml").read_text())
    (tmp_path / "c.yaml").write_text("lr: 0.5\nlearning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        parse_args(FinetuneConfig, ["--config", str(tmp_path / "c.yaml")])


def test_resolved_schedule_by_hand():
    from fcmae.tasks.detect.config import DetectConfig
    from fcmae.training.run import resolve_schedule

    # 36 epochs of 100 steps, milestones at 27 and 33 epochs, warmup capped at 500 steps
    s = resolve_schedule(build(DetectConfig, {}), 100, 8)
    assert (s.total, s.warmup, s.milestones, s.eff_batch, s.lr) == (3600, 360, (2700, 3300), 16, 1e-4)
    # shortened with --max-steps: the milestones keep their place in the run
    s = resolve_schedule(build(DetectConfig, dict(max_steps=360)), 100, 8)
    assert (s.total, s.warmup, s.milestones) == (360, 36, (270, 330))
    # blr scaling: lr = blr x effective batch / 256, and accumulation divides the steps
    s = resolve_schedule(
        build(RunConfig, dict(lr=None, blr=1e-3, batch_size=32, grad_accum=2, epochs=2, warmup_epochs=0.5)), 10, 4
    )
    assert (s.total, s.warmup, s.eff_batch) == (10, 2, 256) and s.lr == pytest.approx(1e-3)


def test_a_runs_config_yaml_starts_a_new_run(tmp_path):
    """config.yaml holds every field flat and the facts resolved at the start (world size, the
    schedule in steps, ...): given back as --config, the facts are skipped and the fields kept."""
    import yaml

    from fcmae.tasks.segment.config import SegmentConfig
    from fcmae.training.config import RUN_FACTS, flatten

    cfg = parse_args(SegmentConfig, ["--data", "d", "--lr", "3e-4", "--num-classes", "5", "--mixed-precision", "auto"])
    facts = dict(world_size=2, total_steps=100, warmup_steps_resolved=10, classes=["a", "b"], abs_lr=3e-4)
    assert set(facts) <= RUN_FACTS
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**flatten(cfg.to_dict()), **facts}))
    again = parse_args(SegmentConfig, ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg and (again.lr, again.num_classes, again.mixed_precision) == (3e-4, 5, "auto")
    with pytest.raises(ValueError, match="--mixed-precision"):
        build(SegmentConfig, dict(data="d", mixed_precision="fp8")).validate()
