"""MATPAC / MATPAC++'s config checks (``PretrainTask.check``), before any data is read or anything is compiled."""

from __future__ import annotations

from matpac_jax.config_lib import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT_CLOSED,
    ConfigError,
    check_int,
    check_numbers,
)
from matpac_jax.models.vit import check_vit_config

DATA_SOURCES = ("records", "tfds", "demo")

OBJECTIVE_CHECKS = {
    "objective.mask_ratio": (lambda v: 0 < v < 1, "a number in (0, 1): some tokens visible, some masked"),
    "objective.mcl_temp_init": POSITIVE,
    "objective.mcl_temp_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "objective.mcl_hard_below": NON_NEGATIVE,
    "objective.student_temp": POSITIVE,
    "objective.teacher_temp_warmup": POSITIVE,
    "objective.teacher_temp": POSITIVE,
    "objective.center_momentum": UNIT_CLOSED,
    "objective.weight_pred": NON_NEGATIVE,
    "objective.weight_cls": NON_NEGATIVE,
    "objective.ema_start": UNIT_CLOSED,
    "objective.ema_end": UNIT_CLOSED,
    "objective.head_ema_start": UNIT_CLOSED,
    "objective.head_ema_end": UNIT_CLOSED,
}


def check_pretrain(config) -> None:
    """ConfigError naming the key: the data source, the ViT and MATPAC's heads, the objective's settings, a mask
    ratio that leaves both the visible and the masked set non-empty."""
    m, a = config.model, config.audio
    source = config.data.source
    if source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source={source!r}: expected one of {', '.join(map(repr, DATA_SOURCES))}")
    if source == "tfds" and not config.data.tfds_name:
        raise ConfigError(
            "config.data.tfds_name is empty: with config.data.source='tfds' name the prepared dataset, e.g. "
            "--config.data.tfds_name=my_audio:1.0.0 --config.data.tfds_data_dir=/data/tfds"
        )
    if config.probe.enabled and source != "demo":
        raise ConfigError(
            f"config.probe.enabled=True with config.data.source={source!r}: the closing probe is the demo's labelled "
            "split; set --config.probe.enabled=False, or probe real datasets during training with "
            "--config.probe.every=N and --config.probe.datasets"
        )
    check_vit_config(config)
    for key in ("mcl_heads", "cls_head.hidden", "cls_head.bottleneck", "cls_head.prototypes"):
        check_int(config, f"model.{key}", 1)
    check_int(config, "objective.teacher_temp_warmup_steps", 0)
    check_numbers(config, OBJECTIVE_CHECKS)
    tokens = (a.n_mels // m.patch) * (a.crop_frames // m.patch)
    visible = int(tokens * (1 - config.objective.mask_ratio))
    if not 0 < visible < tokens:
        raise ConfigError(
            f"config.objective.mask_ratio={config.objective.mask_ratio} leaves {visible} of {tokens} tokens visible: "
            "both the visible and the masked set must be non-empty"
        )
