r"""S-SONDO: distil a MATPAC++ teacher into a small student from its clip embeddings (SPEC §6).

Two jobs, same config file, every host of a pod running the same command:
  1. the teacher pass (once per teacher and corpus): clip embeddings of every 10-s clip, then k-means (k = 50)
       python -m matpac_jax.main --config=configs/ssondo.py:teacher_pass --workdir=/mnt/gcs/teacher_pp \
           --config.teacher.checkpoint=/mnt/gcs/runs/matpac_pp --config.data.train='/mnt/gcs/as32k/train-*.arrayrecord'
  2. distillation (the trainer of pretraining: same checkpoints, resume, metrics, mesh)
       python -m matpac_jax.main --config=configs/ssondo.py --workdir=/mnt/gcs/runs/ssondo_mn10 \
           --config.teacher.embeddings=/mnt/gcs/teacher_pp --config.data.train='/mnt/gcs/as32k/train-*.arrayrecord'
The corpus is best prepared at the student's 32 kHz (`python -m matpac_jax.data.prepare --sample-rate=32000`): the
teacher pass resamples it to 16 kHz for the teacher, the student reads it as is. The trained student (backbone only)
is written to WORKDIR/student/; `python -m matpac_jax.distill.export` turns it into ONNX.

Variants (`--config=configs/ssondo.py:VARIANT[,key=value,...]`):
  (none)        the recipe: mn10 student, 1 - cos loss, cluster-balanced sampling
  teacher_pass  job 1 of the recipe (the same as --config.task=teacher_pass)
  demo          a tiny student of the demo teacher (configs/pp.py:demo) on the demo corpus, minutes on CPU, ending
                with the student's and the teacher's linear probes side by side (README: "S-SONDO demo chain")
  smoke         smallest sizes, a handful of steps (tests)
  Keys: student=mn10|dymn10|eres2net (default: mn10; the demo's is eres2net), loss=cosine|info_nce|kl_softmax|l1|mse,
  steps=N, batch=N.

ImageNet start. The published runs start mn10 / dymn10 from EfficientAT's ImageNet weights (ssondo
knowledge_distillation_training/config.py ``student_model.pretrained_name``: mn10_im / dymn10_im; EfficientAT
models/mn/model.py and models/dymn/model.py ``pretrained_models``). Download them from EfficientAT's release and name
the file (classifier dropped, shapes checked before anything runs; distill.published):
    wget https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/mn10_im.pt     # or dymn10_im.pt
    python -m matpac_jax.main --config=configs/ssondo.py --config.student.init_from=mn10_im.pt ...
    python -m matpac_jax.main --config=configs/ssondo.py:student=dymn10 --config.student.init_from=dymn10_im.pt ...
An mn10 / dymn10 run without it stops before compute with a ConfigError; --config.student.init_from=none starts it
from scratch on purpose (ERes2Net, the demo and smoke variants start from scratch: S-SONDO has no ImageNet ERes2Net).

Expected (SPEC §6, 7-task linear-probe average, teacher MATPAC++ 75.7): mn10 73.0 (96.4 %), ERes2Net 70.8.
"""

import ml_collections as mlc

from matpac_jax import config_lib

common = config_lib.sibling_module(__file__, "common.py")  # the run sections every config shares
STUDENTS = {"mn10": "mobilenet", "dymn10": "dymn", "eres2net": "eres2net"}  # student= -> config.student.arch


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    arg = config_lib.parse_arg(arg, variant="", student="", loss="cosine", steps=0, batch=0)
    # EfficientAT's AudioSet schedule (SPEC §6 names its shape, not its lengths): 200 "epochs" of 100,000 clips at
    # batch 120; warm-up 8 epochs, ramp-down from epoch 80 over 95 epochs to 1 % of the peak.
    c = common.run_config("distill", seed=0, total_steps=166_667)  # task: or 'teacher_pass'
    c.audio = dict(  # SPEC §6: S-SONDO's student front-end (its utils/preprocess.py LogMelSpectrogram), on device
        sample_rate=32_000,
        n_fft=1024,
        win_length=1024,  # 32 ms, periodic Hann, center=False, Slaney mel scale and norm: 624 frames per 10 s
        hop_length=512,  # 16 ms
        n_mels=128,
        f_min=50.0,
        f_max=16_000.0,
        log_offset=1e-3,  # log(x + 1e-3)
        norm_mean=None,  # no normalisation (EfficientAT's (x + 4.5) / 5 belongs to its own, other front-end)
        norm_std=None,
        filterbank_dtype="float32",  # torchaudio's melscale_fbanks arithmetic: the bank the published students saw
        seconds=10.0,  # every clip is exactly this long (first 10 s, zero-padded), for the teacher pass too
    )

    c.student = dict(
        arch="mobilenet",  # 'mobilenet' (EfficientAT mn: width 1.0 = mn10, 2.97 M) or 'eres2net' (S-SONDO's, 1.37 M)
        # or 'dymn' (EfficientAT DyMN: width 1.0 = dymn10, 8.64 M, kernel-attention temperature 30 as S-SONDO
        # trains it; ImageNet start: init_from=dymn10_im.pt)
        width=1.0,
        channels=16,  # eres2net: S-SONDO's m_channels (a 1024-d embedding of 128 mels: 2 x 4·16 channels x 128/16)
        blocks=(3, 4, 6, 3, 3),  # eres2net: blocks per stage (S-SONDO's num_blocks; four entries: 3D-Speaker's)
        dtype="bfloat16",  # compute dtype (the published run: 16-bit mixed); parameters, BatchNorm statistics,
        # optimizer and loss stay float32
        head_hidden=1280,  # projection head d -> 1280 -> Hardswish -> Dropout -> teacher dimension (dropped after)
        dropout=0.2,
        # published weights to start from (distill.published): EfficientAT's mn10_im.pt / dymn10_im.pt (the paper's
        # init; classifier dropped; required for mobilenet / dymn, see the docstring) or a released S-SONDO student
        # .ckpt (backbone, and its projection head when it fits); 'none': from scratch on purpose
        init_from="",
    )
    c.teacher = dict(
        checkpoint="",  # the teacher: encoder directory, training workdir or checkpoint (teacher pass, closing probe)
        embeddings="",  # the teacher pass's workdir (embeddings.npy, keys.json, clusters.npz)
    )
    c.teacher_pass = dict(
        batch=32,  # clips per forward pass (split over the local devices)
        dtype="float16",  # stored embeddings: float16 (15 GB for 2 M x 3840) or float32
        frames=False,  # also store frame-level features [T, 3840] per clip (62x the bytes: ~1 TB for AudioSet)
        clusters=50,  # k of the k-means for balanced sampling (SPEC §6); 0 = none
        kmeans_steps=200,  # mini-batch k-means steps (when kmeans_epochs is 0)
        kmeans_batch=4096,
        kmeans_inits=1,  # k-means++ starts, the best kept (S-SONDO's MiniBatchKMeans: 10)
        kmeans_epochs=0.0,  # > 0: passes over the corpus instead of kmeans_steps (S-SONDO's: up to 100, batch 10,000)
    )
    c.distill = dict(
        loss="cosine",  # 1 - cos (SPEC §6 best); info_nce, kl_softmax, l1, mse
        temperature=0.1,  # info_nce and kl_softmax
        targets="raw",  # teacher embeddings as stored (SPEC §6); 'center' / 'standardize' with corpus statistics
        balanced=True,  # sample clips with probability ∝ 1 / |k-means cluster| (with replacement)
        mixup=0.0,  # α of EfficientAT's mixup (0.3 there); 0 = the un-augmented clip the teacher embedded (SPEC §6)
    )
    c.optim = common.optim(
        optimizer="adamw",  # torch's Adam form (eps after the bias correction), as the published distillation
        lr=8e-4,
        reference_batch=120,
        schedule="warmup_ramp_down",
        warmup_steps=6_667,
        ramp_down_start=66_667,
        ramp_down_steps=79_167,
        final_lr_factor=0.01,
        clip_norm=5.0,
    )
    c.data = common.data(
        train="",  # the record shards the teacher pass read
        batch_size=120,
        demo=dict(num_train=800, num_test=800, seconds=2.0, seed=0, sample_rate=32_000),  # the closing probe's split
    )

    if arg.variant == "teacher_pass":
        c.task = "teacher_pass"
    elif arg.variant in ("demo", "smoke"):
        tiny(c, smoke=arg.variant == "smoke")
    elif arg.variant:
        raise ValueError(f"unknown variant {arg.variant!r} of configs/ssondo.py: use teacher_pass, demo, smoke or none")
    if arg.student in STUDENTS:
        c.student.arch = STUDENTS[arg.student]
    elif arg.student:
        raise ValueError(f"student={arg.student!r}: use one of {', '.join(STUDENTS)}")
    c.distill.loss = arg.loss
    if arg.steps:
        c.total_steps = arg.steps
    if arg.batch:
        c.data.batch_size = arg.batch
    return c


def tiny(c: mlc.ConfigDict, smoke: bool) -> None:
    """2-s clips of the demo corpus (`python -m matpac_jax.data.demo`), a 64-mel front-end with a 20 ms hop, an
    ERes2Net of 8 channels, one block per stage (213,914 parameters; smoke: a MobileNetV3 of width 0.1), batch 32, the
    schedule scaled to the run; the closing probe compares the student, the student at initialisation and the
    teacher."""
    c.total_steps = 6 if smoke else 600
    c.log_every = 2 if smoke else 50
    c.checkpoint.every = 3 if smoke else 200
    c.audio.seconds = 1.0 if smoke else 2.0
    c.audio.n_mels, c.audio.hop_length = 32 if smoke else 64, 640  # a quarter of the recipe's log-mel pixels (demo)
    c.student.arch = "mobilenet" if smoke else "eres2net"  # the demo's MobileNetV3 of 43 k did not learn the task
    c.student.width = 0.1
    c.student.dtype = "float32"  # CPUs have no fast bf16
    c.student.channels, c.student.blocks = 8, (1, 1, 1, 1, 1)  # S-SONDO's five stages, shallow and narrow (demo)
    c.student.head_hidden = 64 if smoke else 256
    c.student.init_from = "none"  # no ImageNet weights at these widths: from scratch on purpose
    c.teacher_pass.batch = 64
    c.teacher_pass.kmeans_steps = 50
    c.teacher_pass.kmeans_batch = 512
    c.teacher_pass.dtype = "float32"
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 2 if smoke else 50
    c.optim.ramp_down_start = 3 if smoke else 200
    c.optim.ramp_down_steps = 3 if smoke else 400
    c.data.batch_size = 8 if smoke else 32
    c.data.workers = 0
    c.data.demo = dict(num_train=32, num_test=16, seconds=2.0, seed=0, sample_rate=32_000) if smoke else c.data.demo
    c.distill.targets = "standardize"  # the demo teacher's embeddings share one direction (89 % of their energy)
    if smoke:
        c.teacher_pass.clusters = 4
    c.probe.enabled = True
    c.probe.steps = 100 if smoke else 1000
    c.probe.seeds = 2 if smoke else 3


# Named sweeps: python -m matpac_jax.sweep --config=configs/ssondo.py[:variant] --sweep=NAME --workdir=DIR [--print]
SWEEPS = {
    "losses": [{"distill.loss": loss} for loss in ("cosine", "info_nce", "kl_softmax", "l1", "mse")],  # SPEC §6
    "balanced": [{"distill.balanced": b} for b in (True, False)],
    "students": [{"student.arch": arch} for arch in STUDENTS.values()],  # mobilenet / dymn need student.init_from
}
