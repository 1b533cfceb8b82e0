r"""``SpeakerBrain``: training speaker-embedding extractors with the objectives of :mod:`spkver.losses`.

Modules (``modules:`` in the hparams): ``embedding_model`` (an
:class:`~spkver.models.EmbeddingExtractor`) and ``classifier``: a
:class:`~spkver.models.CosineClassifier`, whose (B, C) cosines the
``objective`` scores, or a :class:`~spkver.losses.StreamingSparseHead` built
on the same ``objective``, which computes the loss from the embeddings
without (B, C) cosines (very many speakers).  Hparams used: ``objective``,
``augmenter`` (or ``null``), ``margin_warmup`` (a
:class:`~spkver.losses.MarginWarmup` or ``null``), ``lr_schedule`` (a
:class:`LearningRateSchedule`), ``reinit_policy`` (a
:class:`~spkver.losses.ReinitializationPolicy` or ``null``: A3M-I),
``epoch_counter``, ``train_logger`` and ``lr_multipliers`` (the learning
rates of named parameter groups -- ``prototypes``, the extractor's -- as
multiples of the schedule's).

Under ``torchrun`` (DDP) every rank trains on its own shard of each epoch
(:class:`~spkver.distributed.ShardedBatchSampler`: no item twice, none
dropped), BatchNorm is synchronised only where SyncBatchNorm can run (CUDA
with NCCL), a streaming head sharded by class (its ``process_group``) scores
the batch gathered from every rank and is left out of DDP's gradient
averaging, A3M-I's class means are summed over the ranks, and checkpoints hold
the whole prototype matrix (see :mod:`spkver.distributed`).

The margin and the learning rate follow training progress in epochs, stepped
every batch; checkpoints (:class:`~spkver.checkpoints.AtomicCheckpointer`, also
inside an epoch with ``ckpt_interval_steps``/``ckpt_interval_minutes``) let a
killed run resume where it stopped, even one killed while saving.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Mapping, Optional

import speechbrain as sb
import torch

from spkver import distributed
from spkver.checkpoints import load_weights
from spkver.hparams import HparamsError
from spkver.losses import (
    ClassMeanAccumulator,
    MarginWarmup,
    ReinitializationPolicy,
    StreamingSparseHead,
    reinitialize_prototypes,
)

logger = logging.getLogger(__name__)

__all__ = ["SpeakerBrain", "BrainSettings", "LearningRateSchedule", "log_engine_once"]


class _NoTorchvisionNotice(logging.Filter):
    """Drops SpeechBrain's import-time "torchvision is not available" warning.

    The recipe's hparams import ``speechbrain.utils.train_logger``, which warns
    that it cannot save figures without torchvision; spkver saves none through
    it (DET plots use matplotlib), so the warning would only alarm users.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not available" not in record.getMessage()


logging.getLogger("speechbrain.utils.train_logger").addFilter(_NoTorchvisionNotice())


class LearningRateSchedule:
    r"""Linear warm-up to ``peak`` over ``warmup_epochs``, then exponential decay to ``final`` at ``epochs``.

    .. math::
        \eta(t) = \begin{cases} \eta_{peak}\, t / T_w & t < T_w \\
        \eta_{peak} (\eta_{final}/\eta_{peak})^{(t - T_w)/(T - T_w)} & \text{otherwise}\end{cases}

    ``t`` is training progress in epochs (fractional), so the schedule is
    stateless: a resumed run recomputes it.  (WeSpeaker's VoxCeleb recipes use
    this shape.)

    >>> schedule = LearningRateSchedule(peak=0.1, final=0.001, warmup_epochs=1, epochs=3)
    >>> [round(schedule(t), 4) for t in (0.5, 1.0, 2.0, 3.0)]
    [0.05, 0.1, 0.01, 0.001]
    """

    def __init__(self, peak: float, final: float, warmup_epochs: float, epochs: float):
        if not 0 < final <= peak or warmup_epochs < 0 or epochs < warmup_epochs or epochs <= 0:
            raise HparamsError(f"need 0 < final <= peak and 0 <= warmup_epochs <= epochs; got peak={peak}, "
                             f"final={final}, warmup_epochs={warmup_epochs}, epochs={epochs}")
        self.peak, self.final, self.warmup, self.epochs = peak, final, warmup_epochs, epochs

    def __call__(self, progress: float) -> float:
        if progress < self.warmup:
            return self.peak * max(progress, 1e-3) / self.warmup
        if self.epochs == self.warmup:
            return self.peak
        fraction = min(1.0, (progress - self.warmup) / (self.epochs - self.warmup))
        return self.peak * (self.final / self.peak) ** fraction


def log_engine_once(objective, seen: set) -> None:
    """Log which loss engine ran ``objective``'s last call and why, the first time that engine runs."""
    choice = objective.last_engine
    if choice is not None and choice.name not in seen:
        seen.add(choice.name)
        logger.info(f"loss engine: {choice.describe()}")


@dataclass
class BrainSettings:
    """The optional settings :class:`SpeakerBrain` reads from the hparams, with their defaults.

    Read once, validated once (:meth:`from_hparams`): a wrong value is an
    :class:`~spkver.hparams.HparamsError` naming the key, before anything is trained.

    >>> BrainSettings.from_hparams({"lr_multipliers": {"prototypes": 5}, "average_last": 4}).lr_multipliers
    {'prototypes': 5.0}
    >>> BrainSettings.from_hparams({"average_last": 0})
    Traceback (most recent call last):
    ...
    spkver.hparams.HparamsError: average_last must be an integer >= 1 (1: no averaging), got 0
    """

    seed: int = 0                          #: the shuffling seed of the DDP sampler
    batch_size: Optional[int] = None       #: the per-rank batch, for the DDP log line
    augmenter: Optional[object] = None     #: training-time augmentation (``augment(waveforms, lengths)``)
    margin_warmup: Optional[MarginWarmup] = None
    reinit_policy: Optional[ReinitializationPolicy] = None  #: A3M-I
    #: Learning rates of named parameter groups as multiples of the schedule's: ``prototypes``, and the
    #: extractor's groups (``extractor``; an SSL extractor's ``encoder`` and ``backend``). Others: 1.
    lr_multipliers: Optional[dict] = None
    average_last: int = 1                  #: checkpoints kept: the evaluated model averages the last ones

    @classmethod
    def from_hparams(cls, hparams: Mapping) -> "BrainSettings":
        """The settings present in ``hparams`` (others keep their defaults), checked."""
        values = {field.name: hparams[field.name] for field in fields(cls)
                  if field.name in hparams and hparams[field.name] is not None}
        settings = cls(**values)
        if not isinstance(settings.average_last, int) or isinstance(settings.average_last, bool) \
                or settings.average_last < 1:
            raise HparamsError(f"average_last must be an integer >= 1 (1: no averaging), got {settings.average_last!r}")
        multipliers = settings.lr_multipliers or {}
        if not isinstance(multipliers, Mapping):
            raise HparamsError(f"lr_multipliers must map parameter groups to numbers, got {multipliers!r}")
        for name, multiplier in multipliers.items():
            if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or \
                    not 0 <= multiplier < math.inf:
                raise HparamsError(f"lr_multipliers: {name} must be a number >= 0, got {multiplier!r}")
        settings.lr_multipliers = {str(name): float(value) for name, value in multipliers.items()}
        if not isinstance(settings.seed, int):
            raise HparamsError(f"seed must be an integer, got {settings.seed!r}")
        if settings.batch_size is not None and (not isinstance(settings.batch_size, int) or settings.batch_size < 2):
            raise HparamsError(f"batch_size must be an integer >= 2 (BatchNorm needs 2 items per batch), "
                               f"got {settings.batch_size!r}")
        for name, kind in (("margin_warmup", MarginWarmup), ("reinit_policy", ReinitializationPolicy)):
            value = getattr(settings, name)
            if value is not None and not isinstance(value, kind):
                raise HparamsError(f"{name} must be a {kind.__name__} or null, got {type(value).__name__}")
        if settings.augmenter is not None and not callable(settings.augmenter):
            raise HparamsError(f"augmenter must be callable (waveforms, lengths) or null, got "
                               f"{type(settings.augmenter).__name__}")
        return settings


class _EpochStatistics:
    """The epoch's accuracy and posterior statistics, summed on the device and read at the epoch's end."""

    def __init__(self):
        self.rows = 0
        self.sums = None  # [correct, support, p_y = 0, p_y] summed over the epoch's batches

    def update(self, correct: torch.Tensor, statistics) -> None:
        posterior, rows = statistics.sums()
        batch = torch.cat([correct.sum().reshape(1).double(), posterior.double().to(correct.device)])
        self.sums = batch if self.sums is None else self.sums + batch
        self.rows += rows

    def summary(self) -> dict:
        n = max(self.rows, 1)
        correct, support, target_zero, target_prob = [0.0] * 4 if self.sums is None else self.sums.tolist()
        return {"accuracy": correct / n, "support_size": support / n, "p_y_zero": target_zero / n,
                "mean_p_y": target_prob / n}


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, out of a DistributedDataParallel wrapper (SpeechBrain wraps modules under DDP)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def _speaker_targets(batch, device) -> torch.Tensor:
    """The batch's speaker indices as a (B,) tensor (SpeechBrain pads them to (B, 1))."""
    return batch.speaker_index.data.reshape(-1).to(device)


class SpeakerBrain(sb.Brain):
    """Speaker classification training of an embedding extractor (see the module docstring).

    Built on SpeechBrain's public hooks (``make_dataloader``, ``init_optimizers``
    through its ``opt_class``, ``on_fit_start``, ``compute_forward``,
    ``compute_objectives``, ``on_fit_batch_start/end``, ``on_stage_start/end``);
    one private hook, ``_wrap_distributed``, is overridden, for the reason its
    comment gives.  The optional settings are :class:`BrainSettings`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = BrainSettings.from_hparams(vars(self.hparams))
        self.steps_per_epoch: Optional[int] = None
        self.train_loader = None
        self.engines_logged: set = set()
        self.batch_rows = 0

    def make_dataloader(self, dataset, stage, ckpt_prefix="dataloader-", **loader_kwargs):
        """SpeechBrain's loader, except the training loader under DDP: exact shards of each epoch
        (:class:`~spkver.distributed.ShardedBatchSampler`, where SpeechBrain's sampler would pad
        with repeats). Remembers the training loader: its length sets the schedules' progress, and
        A3M-I embeds its batches."""
        if stage != sb.Stage.TRAIN:
            return super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        if self.distributed_launch:
            loader = self._sharded_train_loader(dataset, dict(loader_kwargs), ckpt_prefix)
        else:
            loader = super().make_dataloader(dataset, stage, ckpt_prefix, **loader_kwargs)
        self.train_loader, self.steps_per_epoch = loader, len(loader)
        return loader

    def _sharded_train_loader(self, dataset, loader_kwargs, ckpt_prefix):
        """This rank's loader: its batches of each epoch (:class:`~spkver.distributed.ShardedBatchSampler`)."""
        batch_size = loader_kwargs.pop("batch_size", 1)
        for option in ("shuffle", "drop_last", "sampler"):  # the sampler shuffles and drops nothing
            loader_kwargs.pop(option, None)
        self.train_sampler = distributed.ShardedBatchSampler(
            len(dataset), batch_size, distributed.world_size(), distributed.rank(), seed=self.settings.seed)
        loader = sb.dataio.dataloader.make_dataloader(dataset, batch_sampler=self.train_sampler, **loader_kwargs)
        if self.checkpointer is not None:  # resumable inside an epoch, as SpeechBrain's own loader
            self.checkpointer.add_recoverable(ckpt_prefix + "TRAIN", loader)
        return loader

    @property
    def extractor(self) -> torch.nn.Module:
        """The embedding model itself (out of its DDP wrapper): what is evaluated, averaged and saved."""
        return _unwrapped(self.modules.embedding_model)

    @property
    def sharded_head(self) -> bool:
        """Whether the classifier is a streaming head whose prototypes are sharded over the ranks."""
        head = self.streaming_head
        return head is not None and head.process_group is not None

    # A private hook, SpeechBrain 1.1.2 (speechbrain/core.py, Brain._wrap_distributed): it converts every
    # module to SyncBatchNorm unconditionally, which raises on CPU tensors (gloo), and wraps every trainable
    # module in DDP. No public option turns either off, and a class-sharded head must stay out of DDP (its
    # rows differ per rank: averaging their gradients would mix classes). Re-check on a SpeechBrain upgrade.
    def _wrap_distributed(self):
        """SpeechBrain's DDP wrapping, without SyncBatchNorm where it cannot run and without the sharded head."""
        if not self.distributed_launch:
            return super()._wrap_distributed()
        sync = distributed.sync_batchnorm_supported(self.distributed_backend, self.device)
        batch = self.settings.batch_size
        world = distributed.world_size()
        logger.info(f"DDP over {world} ranks ({self.distributed_backend})"
                    + (f", global batch {world} x {batch} = {world * batch}" if batch else "") + ": BatchNorm "
                    + ("synchronised across ranks (SyncBatchNorm)" if sync else
                       "per rank (SyncBatchNorm needs CUDA and NCCL); rank 0's running statistics are "
                       "broadcast at every forward"))
        for name, module in self.modules.items():
            if not any(p.requires_grad for p in module.parameters()):
                continue
            if name == "classifier" and self.sharded_head:
                continue
            if sync:
                module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
            device_ids = [self.device] if torch.device(self.device).type == "cuda" else None
            self.modules[name] = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=device_ids, find_unused_parameters=self.find_unused_parameters)

    def on_fit_start(self):
        policy = self.settings.reinit_policy
        checkpointer = self.checkpointer
        if policy is not None and checkpointer is not None and "reinit_policy" not in checkpointer.recoverables:
            # Registered before SpeechBrain recovers the checkpoint, so the policy resumes with the rest.
            checkpointer.add_recoverable(
                "reinit_policy", policy,
                custom_save_hook=lambda obj, path: torch.save(obj.state_dict(), path),
                custom_load_hook=lambda obj, path, end_of_epoch=None: obj.load_state_dict(load_weights(path)),
            )
        super().on_fit_start()

    def parameter_groups(self) -> dict:
        """The named parameter groups ``lr_multipliers`` refers to: the extractor's own and ``prototypes``."""
        return {**self.extractor.parameter_groups(), "prototypes": list(self.modules.classifier.parameters())}

    def init_optimizers(self):
        """One optimiser, a parameter group per name of :meth:`parameter_groups`, each at ``lr_multipliers``
        times the scheduled learning rate (1 when not named): the papers train a new prototype layer on a
        pretrained extractor at 5x, and an SSL encoder at 0.08x its back-end's rate.

        SpeechBrain's own ``init_optimizers`` builds it (and registers it for checkpoints), from an
        ``opt_class`` that is handed the groups; a sharded head's checkpoint hooks then gather its rows
        from every rank. A multiplier naming no group is an :class:`~spkver.hparams.HparamsError`.
        """
        if self.opt_class is None:
            return super().init_optimizers()
        base = self.opt_class
        groups = self.parameter_groups()
        multipliers = self.settings.lr_multipliers or {}
        unknown = sorted(set(multipliers) - set(groups))
        if unknown:
            raise HparamsError(f"lr_multipliers: {', '.join(unknown)} names no parameter group of this experiment "
                               f"(its groups: {', '.join(groups)})")
        chosen = [{"params": [p for p in parameters if p.requires_grad], "lr_multiplier": multipliers.get(name, 1.0),
                   "name": name} for name, parameters in groups.items()]
        chosen = [group for group in chosen if group["params"]]
        self.opt_class = lambda _parameters: base(chosen)
        try:
            super().init_optimizers()
        finally:
            self.opt_class = base
        if self.checkpointer is not None and self.sharded_head:  # both hold this rank's rows: save the whole
            head, optimizer = self.streaming_head, self.optimizer
            self.checkpointer.add_recoverable(
                "classifier", head,
                custom_save_hook=lambda obj, path: distributed.save_sharded_rows(obj, None, path),
                custom_load_hook=lambda obj, path, end_of_epoch=None: distributed.load_sharded_rows(obj, None, path))
            self.checkpointer.add_recoverable(
                "optimizer", optimizer,
                custom_save_hook=lambda obj, path: distributed.save_sharded_rows(head, obj, path),
                custom_load_hook=lambda obj, path, end_of_epoch=None: distributed.load_sharded_rows(head, obj, path))

    def progress(self) -> float:
        """Training progress in epochs (fractional within the current one)."""
        epoch = self.hparams.epoch_counter.current
        steps = self.steps_per_epoch or 1
        return max(epoch - 1, 0) + min(self.step, steps) / steps

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        waveforms, lengths = batch.sig
        augmenter = self.settings.augmenter
        if stage == sb.Stage.TRAIN and augmenter is not None:
            waveforms, lengths = augmenter(waveforms, lengths)
        embeddings = self.modules.embedding_model(waveforms, lengths)
        if self.streaming_head is not None:
            return embeddings  # the head scores them with the targets (compute_objectives)
        return self.modules.classifier(embeddings)

    @property
    def streaming_head(self):
        """The classifier when it is a :class:`~spkver.losses.StreamingSparseHead` (else ``None``)."""
        classifier = _unwrapped(self.modules.classifier)
        return classifier if isinstance(classifier, StreamingSparseHead) else None

    def compute_objectives(self, outputs, batch, stage):
        """The objective's loss of the batch; ``outputs`` are cosines, or embeddings for a streaming head.

        Nothing is read back from the device here: the statistics are summed there and read at the
        epoch's end, the input checks after the step (:meth:`on_fit_batch_end`).
        """
        targets = _speaker_targets(batch, self.device)
        augmenter = self.settings.augmenter
        if stage == sb.Stage.TRAIN and augmenter is not None:
            targets = augmenter.replicate_labels(targets)
        if self.sharded_head:  # every rank scores the whole gathered batch against its classes
            loss = self.modules.classifier(distributed.gather_rows(outputs), distributed.gather_rows(targets))
            correct = self.streaming_head.last_correct
        elif self.streaming_head is not None:
            loss = self.modules.classifier(outputs, targets)
            correct = self.streaming_head.last_correct
        else:
            loss = self.hparams.objective(outputs, targets)
            correct = outputs.detach().argmax(1) == targets
        self.epoch_statistics.update(correct, self.hparams.objective.last_statistics)
        self.batch_rows = targets.shape[0]  # this rank's rows (with augmented copies), for A3M-I's count
        return loss

    def on_fit_batch_start(self, batch, should_step):
        progress = self.progress()
        warmup = self.settings.margin_warmup
        if warmup is not None:
            warmup.step(self.hparams.objective, progress)
        learning_rate = self.hparams.lr_schedule(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate * group.get("lr_multiplier", 1.0)

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """After the step (SpeechBrain has read the loss back by now): the batch's input checks and
        statistics, the engine log line once, A3M-I's count of p_y = 0."""
        objective = self.hparams.objective
        statistics = objective.last_statistics.check()  # bad input raises its error here, naming it
        log_engine_once(objective, self.engines_logged)
        if self.settings.reinit_policy is not None:
            self.settings.reinit_policy.observe(statistics, self.batch_rows)

    def evaluate_batch(self, batch, stage):
        """SpeechBrain's, then the batch's input checks (after SpeechBrain has read the loss back)."""
        loss = super().evaluate_batch(batch, stage)
        self.hparams.objective.last_statistics.check()
        return loss

    def on_stage_start(self, stage, epoch=None):
        self.epoch_statistics = _EpochStatistics()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        summary = {"loss": stage_loss, **self.epoch_statistics.summary()}
        if stage == sb.Stage.TRAIN:
            self.train_summary = summary
            policy = self.settings.reinit_policy
            if policy is not None:
                policy.merge_across_ranks()  # every rank must take the same decision
                collapse = policy.collapse_fraction
                if policy.should_fire(epoch):
                    classes = self.reinitialise_prototypes()
                    logger.info(f"A3M-I: epoch {epoch} ended with p_y = 0 for {100 * collapse:.1f} % of samples; "
                                f"prototypes of {classes} classes re-initialised to class-mean embeddings")
                    self.train_summary["a3m_i_fired"] = 1
            return
        if stage == sb.Stage.VALID:
            meta = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"],
                    "margin": self.hparams.objective.margin}
            self.hparams.train_logger.log_stats(stats_meta=meta, train_stats=getattr(self, "train_summary", None),
                                                valid_stats=summary)
            if self.checkpointer is not None:
                # The last `average_last` epochs are kept: the evaluated model is their average.
                self.checkpointer.save_and_keep_only(meta={"loss": stage_loss, "epoch": epoch},
                                                     num_to_keep=self.settings.average_last)

    @torch.no_grad()
    def reinitialise_prototypes(self) -> int:
        """A3M-I: set every prototype to the normalised mean of its class's embeddings (no augmentation)."""
        classifier = _unwrapped(self.modules.classifier)
        classes = classifier.num_classes if self.sharded_head else classifier.weight.shape[0]  # all, not a shard
        accumulator = ClassMeanAccumulator(classes, classifier.weight.shape[1], device=classifier.weight.device)
        training = self.modules.training
        self.modules.eval()
        for batch in self.train_loader:  # this rank's shard of the epoch
            batch = batch.to(self.device)
            waveforms, lengths = batch.sig
            accumulator.update(self.modules.embedding_model(waveforms, lengths), _speaker_targets(batch, self.device))
        self.modules.train(training)
        accumulator.merge_across_ranks()  # the class means of the whole epoch, the same on every rank
        if self.sharded_head:
            start = classifier.class_offset
            accumulator = accumulator.rows(start, start + classifier.weight.shape[0])
        return reinitialize_prototypes(classifier.weight, accumulator, self.optimizer)
