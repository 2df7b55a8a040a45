r"""MATPAC++ pretraining on AudioSet: the paper recipe (SPEC §1–§4).

ViT-B/16 encoder on 80×608 log-mel crops, 8-block predictor with K = 5 MCL hypotheses (annealed winner-takes-all),
DINO-style unsupervised classification (2048 prototypes), global batch 2048, 294,816 steps (300 epochs of
2,012,615 clips ≥ 6.08 s), AdamW (0.9, 0.95), lr 3e-4, bf16 compute with fp32 params and EMA.

Launch (every host of a pod / cluster runs the same command; launch/ has the scripts):
  python -m matpac_jax.main --config=configs/pp.py --workdir=/mnt/gcs/runs/matpac_pp \
      --config.data.train='/mnt/gcs/audioset/train-*.arrayrecord'

Variants (`--config=configs/pp.py:VARIANT[,key=value,...]`):
  demo   tiny model on the built-in synthetic corpus, 2 CPU cores, a few minutes; ends with a linear probe
  smoke  smallest model, a handful of steps (tests)
  Keys: batch=N (global batch), mcl_heads=K, steps=N.

Expected (published MATPAC++, linear probe on frozen 3840-d clip embeddings):
  OpenMIC 85.6, NSynth 76.8, GTZAN 87.6, MTT 40.8, FSD50K 56.1, ESC-50 93.1, US8K 89.7, average 75.7.
Cost: ≈ 93 GFLOP per sample per step; the whole run ≈ 5.6e19 FLOP.
"""

import ml_collections as mlc

from matpac_jax import config_lib

common = config_lib.sibling_module(__file__, "common.py")  # the run sections every config shares


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    arg = config_lib.parse_arg(arg, variant="", batch=0, mcl_heads=-1, steps=0)
    c = common.run_config("pretrain", seed=1337, total_steps=294_816)
    c.audio = dict(  # SPEC §1: the teacher front-end
        sample_rate=16_000,
        n_fft=400,
        win_length=400,
        hop_length=160,
        n_mels=80,
        f_min=50.0,
        f_max=8_000.0,
        log_offset=1.1920929e-07,
        norm_mean=-7.056,
        norm_std=4.193,
        crop_frames=608,  # 6.08 s; 97,520 samples
    )

    c.model = dict(
        patch=16,
        encoder=dict(dim=768, depth=12, heads=12, mlp_ratio=4.0),
        predictor=dict(dim=512, depth=8, heads=16, mlp_ratio=4.0),
        mcl_heads=5,  # K hypotheses; 1 = MATPAC
        cls_head=dict(hidden=2048, bottleneck=256, prototypes=2048, teacher_init="copy_initial"),
        dtype="bfloat16",  # compute dtype; params, optimizer and EMA stay float32
        attn_impl="auto",  # cuDNN flash attention on NVIDIA GPUs in bf16, XLA's elsewhere; or 'xla' / 'cudnn'
        remat="",  # '' | 'full' | 'dots': recompute transformer blocks in the backward pass (less memory)
        attn_pad_to=0,  # pad attention sequences to a multiple (with key lengths); 'cudnn' pads to 64 by itself
        scan_layers=False,  # run the blocks as one lax.scan (one compiled block; same parameter layout)
    )

    c.objective = dict(
        mask_ratio=0.7,  # 57 visible, 133 masked of 190
        mcl_temp_init=0.1,
        mcl_temp_decay=0.99997,
        mcl_hard_below=1e-4,  # T(t) = 0.1·0.99997^t; hard WTA after
        student_temp=0.1,
        teacher_temp_warmup=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_steps=9_827,
        center_momentum=0.9,
        center_from="probs",  # reference quirk: mean teacher *probabilities*; 'logits' = DINO
        weight_pred=0.5,
        weight_cls=0.5,
        ema_start=0.99995,
        ema_end=0.99999,  # teacher encoder, linear over the run
        head_ema_start=0.998,
        head_ema_end=1.0,  # teacher cls head, linear over the run
    )

    c.optim = common.optim(
        optimizer="adamw_fairseq",  # SPEC §4: fairseq's Adam (eps on √v)
        lr=3e-4,
        reference_batch=2048,
        b2=0.95,
        eps=1e-6,
        weight_decay=0.05,
        warmup_steps=19_654,
        clip_norm=3.0,
    )
    c.data = common.data(
        batch_size=2048,
        short_clips="skip",  # 'skip' or 'pad' clips shorter than a crop
        demo=dict(num_train=0, num_test=0, seconds=0.0, seed=0),
    )

    if arg.variant in ("demo", "smoke"):
        tiny(c, smoke=arg.variant == "smoke")
    elif arg.variant:
        raise ValueError(f"unknown variant {arg.variant!r} of configs/pp.py: use demo, smoke or none")
    if arg.batch:
        c.data.batch_size = arg.batch
    if arg.mcl_heads >= 0:
        c.model.mcl_heads = arg.mcl_heads
    if arg.steps:
        c.total_steps = arg.steps
    return c


def tiny(c: mlc.ConfigDict, smoke: bool) -> None:
    """Small model on the built-in demo corpus, schedules scaled to the short run.

    demo: ~1,200 steps of batch 32 on 2 CPU cores in about 3 minutes. The teacher EMA is slow (0.999 -> 0.9999), as
    in the recipe relative to its run length; the MCL temperature reaches hard winner-takes-all at step ~990.
    """
    c.total_steps = 8 if smoke else 1200
    c.log_every = 2 if smoke else 100
    c.checkpoint.every = 2 if smoke else 400
    c.audio.crop_frames = 128  # 1.28 s crops: 5 x 8 = 40 patches
    c.model.dtype = "float32"  # CPUs have no fast bf16
    if smoke:
        c.model.encoder = dict(dim=64, depth=2, heads=4, mlp_ratio=4.0)
        c.model.predictor = dict(dim=32, depth=1, heads=4, mlp_ratio=4.0)
        c.model.cls_head = dict(hidden=64, bottleneck=32, prototypes=64, teacher_init="copy_initial")
    else:
        c.model.encoder = dict(dim=64, depth=4, heads=4, mlp_ratio=4.0)
        c.model.predictor = dict(dim=64, depth=2, heads=4, mlp_ratio=4.0)
        c.model.cls_head = dict(hidden=256, bottleneck=64, prototypes=256, teacher_init="copy_initial")
    c.objective.mcl_temp_decay = 0.9 if smoke else 0.993  # 0.1 * 0.993^t < 1e-4 after ~990 steps
    c.objective.teacher_temp_warmup_steps = 4 if smoke else 300
    c.objective.ema_start, c.objective.ema_end = 0.999, 0.9999
    c.objective.head_ema_start, c.objective.head_ema_end = 0.99, 1.0
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 2 if smoke else 100
    c.data.source = "demo"
    c.data.batch_size = 8 if smoke else 32
    c.data.demo = (
        dict(num_train=32, num_test=16, seconds=2.0, seed=0)
        if smoke
        else dict(num_train=800, num_test=800, seconds=2.0, seed=0)
    )
    c.probe.enabled = True
    c.probe.steps = 200 if smoke else 1000


# Named sweeps: python -m matpac_jax.sweep --config=configs/pp.py[:variant] --sweep=NAME --workdir=DIR [--print]
SWEEPS = {
    "mcl_heads": [{"model.mcl_heads": k} for k in (1, 3, 5)],  # MATPAC (K = 1) against MATPAC++
    "lr": [{"optim.lr": lr} for lr in (1e-4, 3e-4, 1e-3)],
    "large_batch": [  # batch 8192 with each optimizer and lr rule, against the recipe's 2048
        {"data.batch_size": 8192, "optim.optimizer": opt, "optim.lr_scaling": rule}
        for opt in ("adamw", "lamb")
        for rule in ("linear", "sqrt")
    ],
}
