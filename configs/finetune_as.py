r"""AudioSet fine-tuning of a pretrained ViT encoder with the published AudioSet head (SPEC §5), the recipe of
nttcslab/m2d's published fine-tuning (its scripts run nttcslab/eval-audio-repr's ``finetune.py``, "EVAR").

  python -m matpac_jax.main --config=configs/finetune_as.py:as2m --workdir=/ckpt/ft_as2m \
      --config.finetune.init_from=/ckpt/matpac_pp --config.data.train='/data/as2m/*.arrayrecord' \
      --config.finetune.eval='/data/as_eval/*.arrayrecord'

Where each number comes from:
  input        992 frames (62 time patches), the published fine-tuned MATPAC++ (SPEC §5: pos_embed [1, 311, 768]);
               m2d: --dur_frames 1001, 62 time patches (util/ft-as2m.sh:25)
  positions    the pretrained 5x38 table resampled bicubically to 5x62 and kept fixed (m2d runtime_audio.py:153-158,
               F.interpolate bicubic, align_corners False; models.positions); finetune.positions='sincos': the exact
               5x62 sin-cos table instead (up to 2.02 apart per element)
  head         token mean -> BatchNorm1d(768, affine=False) -> Linear(768, 527) (SPEC §5; EVAR finetune.py:315-323)
  class order  unit i = the i-th class of class_labels_indices.csv sorted by mid, not its index column
               (aurianworld/matpac inference_matpac/matpac/model.py:92-94; EVAR evar/data.py:73-75): the label ids
               data.prepare stores (manifest label_order 'mid'); shards of an older prepare are refused, re-run it
  loss         mean sigmoid BCE (EVAR finetune.py:125-126)
  optimizer    --optim lars: timm Lars(lr, momentum=0.9, weight_decay=0), which with weight decay 0 skips its trust
               ratio: SGD with momentum 0.9 (EVAR finetune.py:221); AS20K: SGD, momentum 0.9 (finetune.py:220, 348)
  lr, batch    AS2M: lr 2.0, batch 64 (util/ft-as2m.sh:25); AS20K: lr 0.5, batch 64 (util/ft-as20k.sh:19)
  schedule     'timm_cosine': timm CosineLRScheduler(t_initial=epochs, lr_min=1e-7, warmup_t, warmup_lr_init=0), its
               cosine over the whole run, warm-up included, stepped after every update at epoch + iter / epoch_iters
               (EVAR finetune.py:225, 250-264; train.optim.timm_cosine); AS2M 70 epochs, warm-up 15 (util/ft-as2m.sh:
               25); AS20K 200 epochs, warm-up 5 (config/m2d.yaml:35, 40); no gradient clipping in EVAR (clip_norm 1e9
               here: never reached)
  epochs       AS2M: 200,000 distinct clips drawn per epoch by label frequency, without replacement within the epoch
               (torch WeightedRandomSampler(weights, 200000, replacement=False), evar/data.py:154-155, renewed each
               epoch; finetune.sampler.LabelWeightedEpochs), 3,125 steps of 64; AS20K: 20,550 clips, 321 steps
  sampling     AS2M: label-frequency weights, clip weight (Σ 1000 / (count + 0.01))^(1/1.5) over its labels
               (eval-audio-repr evar/utils/make_as_metadata.py:83-93); AS20K: uniform (evar/ds_tasks.py:24)
  augmentation mixup α 0.5 (AS2M) / 0.3 (AS20K), one frequency stripe < 30 bins and one time stripe < 192 frames
               (util/ft-as2m.sh:25, ft-as20k.sh:19; torchaudio masking as EVAR finetune.py:95-100); mixup mixes what
               EVAR's loader gives: AS2M's stored log-mels (evar/data.py:146-165), AS20K's waveforms
               (evar/data.py:170-188, finetune.py:254); AS20K: EVAR's random resize crop after the stripes (--rrc
               True, ft-as20k.sh:19; finetune.py:24-66, 112-115: virtual crop ×(1.0, 1.5), scales (0.6, 1.5),
               bicubic, align_corners=True; finetune.augment)
  token mask   --training_mask 0.5 in both (ft-as2m.sh:25, ft-as20k.sh:19): m2d's random structured masking of the
               patch tokens in training, none in evaluation (m2d/runtime_audio.py:248-249, 331-333;
               patch_m2d.diff:2245-2266; finetune.token_mask)
  precision    float32, as EVAR (no autocast in finetune.py:250-262); `:as2m,dtype=bfloat16` computes in bfloat16
               (its measured difference: BENCHMARKS.md, fine-tuning)
  layer decay  none in m2d (one parameter group, EVAR finetune.py:219-222); config.optim.layer_decay < 1 gives MAE's
  evaluation   after every epoch, on the evaluation set (AudioSet has no validation split in EVAR:
               evar/utils/make_as_metadata.py:138, 147; finetune.py:234-237, 274-277); the published figure is the best
               epoch's mAP (finetune.py:282-292, 310): WORKDIR/best.json, not the final model's eval.json. Deliberate
               difference: an AS20K epoch is 321 full batches here, 322 in EVAR (its last batch holds the other 6
               clips): 6 of 20,550 clips (0.03 %) left out of each epoch, 200 fewer updates of 64,400; the schedule, in
               epochs, is the same

Variants (`--config=configs/finetune_as.py:VARIANT[,dtype=bfloat16]`): as2m (the default), as20k, demo (the demo
encoder of configs/pp.py:demo on the demo corpus's 8 classes, minutes on CPU; launch/finetune_demo.sh compares it with
the frozen encoder and with training from scratch), smoke (tests); dtype: the compute dtype (float32 by default).
Expected (published): MATPAC++ AS2M 48.1 mAP (SPEC §7); M2D/0.7 47.9, M2D-AS 48.5 (nttcslab/m2d README).
"""

import ml_collections as mlc

from matpac_jax import config_lib

common = config_lib.sibling_module(__file__, "common.py")  # the run sections every config shares

AS2M_EPOCH, AS20K_EPOCH = 3_125, 321  # steps per epoch at batch 64 (200,000 drawn clips; 20,550 clips)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    arg = config_lib.parse_arg(arg, variant="as2m", dtype="float32")
    c = common.run_config("finetune", seed=0, total_steps=70 * AS2M_EPOCH)
    c.audio = dict(  # SPEC §1: the encoder's front-end
        sample_rate=16_000, n_fft=400, win_length=400, hop_length=160, n_mels=80, f_min=50.0, f_max=8_000.0,
        log_offset=1.1920929e-07, norm_mean=-7.056, norm_std=4.193,
        crop_frames=992,  # 9.92 s: the published fine-tuned input (62 time patches)
    )  # fmt: skip
    c.model = dict(patch=16, encoder=dict(dim=768, depth=12, heads=12, mlp_ratio=4.0), dtype="float32",
                   attn_impl="auto", remat="", attn_pad_to=0, scan_layers=False)  # fmt: skip
    c.finetune = dict(
        init_from="",  # a ViT encoder load_model reads (model dir, training workdir, checkpoint); '' = from scratch
        num_classes=527,
        freeze_encoder=False,  # True: only the head trains (the frozen-encoder baseline)
        positions="pretrained",  # init_from's table moved to crop_frames as m2d does; 'sincos': the exact table
        mixup=0.5,
        mixup_on="log_mel",  # what mixup mixes: 'log_mel' (EVAR's AS2M loader) or 'waveform' (its AS20K loader)
        rrc=False,  # EVAR's random resize crop (AS20K)
        training_mask=0.5,  # m2d's structured token masking ratio in training; 0 = off
        freq_mask=30,
        time_mask=192,
        time_shift=0,  # random cyclic time shift in [-N, N) frames (AudioMAE's, off in m2d)
        balanced=True,  # label-frequency weighted sampling (AS2M)
        draws_per_epoch=200 * 1000,  # distinct clips per epoch when balanced; 0 = with replacement (AST, AudioMAE)
        eval="",  # the evaluation set's record shards (glob or prepare output): every clip, in order
        eval_every=AS2M_EPOCH,  # steps between evaluations: an epoch, as EVAR; the best mAP's model in WORKDIR/best
        bootstrap=1000,  # resamples of the clips for the final evaluation's 95 % CI
    )
    c.optim = common.optim(optimizer="sgd", lr=2.0, reference_batch=64, b1=0.9, weight_decay=0.0, clip_norm=1e9,
                           schedule="timm_cosine", lr_min=1e-7, warmup_steps=15 * AS2M_EPOCH)  # fmt: skip
    c.data = common.data(batch_size=64, demo=dict(num_train=0, num_test=0, seconds=0.0, seed=0))

    if arg.variant == "as20k":
        c.total_steps, c.optim.lr, c.optim.warmup_steps = 200 * AS20K_EPOCH, 0.5, 5 * AS20K_EPOCH
        c.finetune.mixup, c.finetune.balanced, c.finetune.eval_every = 0.3, False, AS20K_EPOCH
        c.finetune.mixup_on, c.finetune.rrc = "waveform", True
    elif arg.variant in ("demo", "smoke"):
        tiny(c, smoke=arg.variant == "smoke")
    elif arg.variant != "as2m":
        raise ValueError(f"unknown variant {arg.variant!r} of configs/finetune_as.py: use as2m, as20k, demo or smoke")
    if arg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"configs/finetune_as.py: dtype={arg.dtype!r}, expected float32 (EVAR's) or bfloat16")
    c.model.dtype = arg.dtype
    return c


def tiny(c: mlc.ConfigDict, smoke: bool) -> None:
    """The demo encoder's shape (configs/pp.py:demo; smoke: :smoke) on the demo corpus's 8 classes, 2-s clips cut to
    192 frames (160 for smoke): longer than the 128 frames it was pretrained on, so the positions are resampled as for
    AudioSet's 992. AdamW, stripes scaled to the short input, the recipe's token masking; 16 distinct clips per
    epoch when balanced (the tests' 24 labelled records)."""
    c.total_steps = 6 if smoke else 400
    c.log_every = 2 if smoke else 50
    c.checkpoint.every = 3 if smoke else 200
    c.audio.crop_frames = 160 if smoke else 192
    c.model.encoder = dict(dim=64, depth=2 if smoke else 4, heads=4, mlp_ratio=4.0)
    c.finetune.update(num_classes=8, mixup=0.3, freq_mask=8, time_mask=24, balanced=False, draws_per_epoch=16,
                      eval_every=3 if smoke else 100, bootstrap=20 if smoke else 200)  # fmt: skip
    c.optim = common.optim(optimizer="adamw", lr=1e-3, reference_batch=32, weight_decay=0.05,
                           warmup_steps=2 if smoke else 40, clip_norm=1.0)  # fmt: skip
    c.data.source = "demo"
    c.data.batch_size = 8 if smoke else 32
    clips = (32, 16) if smoke else (800, 800)  # the demo split of configs/pp.py:demo (smoke: :smoke)
    c.data.demo = dict(num_train=clips[0], num_test=clips[1], seconds=2.0, seed=0)
