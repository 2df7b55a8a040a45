"""The sections every run config shares, with their defaults in one place: what the trainer reads around the method
(seed, steps, logging, checkpoints, non-finite policy, profiling, mesh, probes) and the keys of the ``optim`` and
``data`` sections that a method does not set itself. A method's config (configs/pp.py, configs/ssondo.py) starts
from ``run_config`` and sets its own sections."""

import ml_collections as mlc


def run_config(task: str, *, seed: int, total_steps: int, log_every: int = 100) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.task = task
    c.seed = seed
    c.total_steps = total_steps
    c.log_every = log_every  # console line every N steps (metrics.jsonl and TensorBoard get every step)
    c.checkpoint = dict(
        every=5_000,  # save every N steps, at the end and on preemption (SIGTERM)
        keep=3,  # keep the last N checkpoints ...
        keep_period=0,  # ... and, if > 0, every checkpoint whose step is a multiple of this
        async_save=True,  # write in the background; the step waits only for the device-to-host copy
        reset_data=False,  # restore the state but restart the data pipeline (e.g. after changing the process count)
        verify=True,  # resume only from a checkpoint whose files match its checksums.json (else the previous one)
        allow_changes="",  # 'key,key': config keys accepted to differ from the checkpoint's on resume (e.g. optim.lr)
    )
    c.nonfinite = "stop"  # NaN/Inf loss, grad norm or new state: 'stop' (report, save nothing new, exit 3) or 'skip'
    c.nonfinite_max_skips = 10  # 'skip': stop (exit 3) after this many non-finite updates in a row
    c.stall_timeout_s = 1800  # no step finished for this long (once one ended): stop, exit 5 (train/stall.py); 0: off
    c.profile_steps = ()  # (a, b) with 0 <= a < b: jax.profiler trace of steps [a, b) into WORKDIR/profile
    c.mesh = dict(data=-1, fsdp=1, dcn_data=1)  # -1: all remaining devices; dcn_data: slices / nodes (parallel.py)
    c.probe = dict(
        enabled=False,  # the demo's closing probe, mean ± 95 % CI over seeds
        steps=1000,  # max Adam steps per probe (early stopping on validation)
        seeds=3,
        every=0,  # > 0 (pretraining): probe the current encoder every N steps (demo split and/or datasets below)
        # (adapter, root) pairs of matpac_jax.evaluate.datasets, e.g. (('esc50', '/data/ESC-50'),)
        datasets=(),
    )
    return c


def optim(**settings) -> dict:
    """The ``optim`` section: these defaults, then ``settings``."""
    return (
        dict(
            optimizer="adamw",  # 'adamw_fairseq' (fairseq's Adam), 'adamw' (optax's), 'lamb' / 'lars' for large batches
            lr=1e-3,  # peak, at reference_batch
            lr_scaling="none",  # 'linear' / 'sqrt': scale lr from reference_batch to data.batch_size
            reference_batch=256,
            accum_steps=1,  # gradient accumulation (every method): the batch in A micro-batches, one update
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            wd_exclude_bias_norm_tokens=False,  # True = M2D: no decay on biases, norms, tokens
            schedule="warmup_cosine",  # or 'warmup_ramp_down' (EfficientAT's), 'timm_cosine' (EVAR's fine-tuning)
            warmup_steps=0,
            lr_min=0.0,  # 'timm_cosine' only: the cosine's floor
            ramp_down_start=0,  # 'warmup_ramp_down' only
            ramp_down_steps=0,
            final_lr_factor=0.01,
            clip_norm=1.0,
            layer_decay=1.0,  # < 1: MAE's layer-wise lr decay, lr x decay^(depth + 1 - layer) (models.layer_decay)
        )
        | settings
    )


def data(**settings) -> dict:
    """The ``data`` section: these defaults, then ``settings``."""
    return (
        dict(
            source="records",  # 'records' (ArrayRecord shards), 'tfds' (a tfds dataset) or 'demo' (synthetic corpus)
            train="",  # glob of training shards, or a prepare output folder / its manifest.json
            tfds_name="",  # source 'tfds': 'name[:version]' of a tfds dataset prepared in ArrayRecord format
            tfds_data_dir="",  # source 'tfds': its tfds data_dir ('' = $TFDS_DATA_DIR, else ~/tensorflow_datasets)
            tfds_split="train",  # source 'tfds': split(s) to train on, tfds syntax ('train+validation', 'train[:90%]')
            batch_size=256,  # global
            workers=8,  # grain worker processes per host; 0 = in the main process
            device_prefetch=2,  # batches read and transferred to the devices ahead of the step
        )
        | settings
    )
