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
``epoch_counter``, ``train_logger`` and ``prototype_lr_multiplier`` (the
prototypes' learning rate as a multiple of the extractor's).

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
from dataclasses import dataclass

import speechbrain as sb
import torch

from spkver import distributed
from spkver.hparams import HparamsError
from spkver.losses import ClassMeanAccumulator, StreamingSparseHead, reinitialize_prototypes

logger = logging.getLogger(__name__)

__all__ = ["SpeakerBrain", "LearningRateSchedule", "log_engine_once"]


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
class _EpochStatistics:
    rows: int = 0
    correct: int = 0
    support: float = 0.0
    target_zero: float = 0.0
    target_prob: float = 0.0

    def update(self, correct: torch.Tensor, statistics) -> None:
        rows = correct.shape[0]
        self.rows += rows
        self.correct += int(correct.sum())
        self.support += statistics.support_size * rows
        self.target_zero += statistics.target_zero_fraction * rows
        self.target_prob += statistics.target_prob * rows

    def summary(self) -> dict:
        n = max(self.rows, 1)
        return {"accuracy": self.correct / n, "support_size": self.support / n,
                "p_y_zero": self.target_zero / n, "mean_p_y": self.target_prob / n}


def _unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, out of a DistributedDataParallel wrapper (SpeechBrain wraps modules under DDP)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def _speaker_targets(batch, device) -> torch.Tensor:
    """The batch's speaker indices as a (B,) tensor (SpeechBrain pads them to (B, 1))."""
    return batch.speaker_index.data.reshape(-1).to(device)


class SpeakerBrain(sb.Brain):
    """Speaker classification training of an embedding extractor (see the module docstring)."""

    def fit(self, epoch_counter, train_set, valid_set=None, progressbar=None, train_loader_kwargs=None,
            valid_loader_kwargs=None):
        train_loader_kwargs = dict(train_loader_kwargs or {})
        if not isinstance(train_set, torch.utils.data.DataLoader):
            if self.distributed_launch:
                train_set = self._sharded_train_loader(train_set, train_loader_kwargs)
            else:
                train_set = self.make_dataloader(train_set, stage=sb.Stage.TRAIN, **train_loader_kwargs)
        self.steps_per_epoch = len(train_set)
        self.train_loader = train_set
        return super().fit(epoch_counter, train_set, valid_set, progressbar=progressbar,
                           valid_loader_kwargs=valid_loader_kwargs or {})

    def _sharded_train_loader(self, dataset, loader_kwargs):
        """This rank's loader: its batches of each epoch (:class:`~spkver.distributed.ShardedBatchSampler`)."""
        batch_size = loader_kwargs.pop("batch_size", 1)
        for option in ("shuffle", "drop_last", "sampler"):  # the sampler shuffles and drops nothing
            loader_kwargs.pop(option, None)
        self.train_sampler = distributed.ShardedBatchSampler(
            len(dataset), batch_size, distributed.world_size(), distributed.rank(),
            seed=int(getattr(self.hparams, "seed", 0) or 0))
        loader = sb.dataio.dataloader.make_dataloader(dataset, batch_sampler=self.train_sampler, **loader_kwargs)
        if self.checkpointer is not None:  # resumable inside an epoch, as SpeechBrain's own loader
            self.checkpointer.add_recoverable("dataloader-TRAIN", loader)
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

    def _wrap_distributed(self):
        """SpeechBrain's DDP wrapping, without SyncBatchNorm where it cannot run and without the
        sharded head (its rows differ per rank: averaging their gradients would mix classes)."""
        if not self.distributed_launch:
            return super()._wrap_distributed()
        sync = distributed.sync_batchnorm_supported(self.distributed_backend, self.device)
        batch = getattr(self.hparams, "batch_size", None)
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
        policy = getattr(self.hparams, "reinit_policy", None)
        checkpointer = self.checkpointer
        if policy is not None and checkpointer is not None and "reinit_policy" not in checkpointer.recoverables:
            # Registered before SpeechBrain recovers the checkpoint, so the policy resumes with the rest.
            checkpointer.add_recoverable(
                "reinit_policy", policy,
                custom_save_hook=lambda obj, path: torch.save(obj.state_dict(), path),
                custom_load_hook=lambda obj, path, end_of_epoch=None: obj.load_state_dict(torch.load(path)),
            )
        super().on_fit_start()

    def init_optimizers(self):
        """One optimiser, two parameter groups: the extractor at the scheduled learning rate and the
        prototypes at ``prototype_lr_multiplier`` times it (the papers train a new prototype layer on
        a pretrained extractor at 5x)."""
        if self.opt_class is None:
            return super().init_optimizers()
        multiplier = getattr(self.hparams, "prototype_lr_multiplier", 1.0)
        groups = [{"params": list(self.modules.embedding_model.parameters()), "lr_multiplier": 1.0},
                  {"params": list(self.modules.classifier.parameters()), "lr_multiplier": float(multiplier)}]
        self.optimizer = self.opt_class(groups)
        self.optimizers_dict = {"opt_class": self.optimizer}
        if self.checkpointer is None:
            return
        if self.sharded_head:  # both hold rows of this rank only: checkpoint the whole matrix
            head, optimizer = self.streaming_head, self.optimizer
            self.checkpointer.add_recoverable(
                "classifier", head,
                custom_save_hook=lambda obj, path: distributed.save_sharded_rows(obj, None, path),
                custom_load_hook=lambda obj, path, end_of_epoch=None: distributed.load_sharded_rows(obj, None, path))
            self.checkpointer.add_recoverable(
                "optimizer", optimizer,
                custom_save_hook=lambda obj, path: distributed.save_sharded_rows(head, obj, path),
                custom_load_hook=lambda obj, path, end_of_epoch=None: distributed.load_sharded_rows(head, obj, path))
        else:
            self.checkpointer.add_recoverable("optimizer", self.optimizer)

    def progress(self) -> float:
        """Training progress in epochs (fractional within the current one)."""
        epoch = self.hparams.epoch_counter.current
        steps = getattr(self, "steps_per_epoch", 0) or 1
        return max(epoch - 1, 0) + min(self.step, steps) / steps

    def compute_forward(self, batch, stage):
        batch = batch.to(self.device)
        waveforms, lengths = batch.sig
        augmenter = getattr(self.hparams, "augmenter", None)
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
        """The objective's loss of the batch; ``outputs`` are cosines, or embeddings for a streaming head."""
        targets = _speaker_targets(batch, self.device)
        augmenter = getattr(self.hparams, "augmenter", None)
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
        statistics = self.hparams.objective.last_statistics
        self.epoch_statistics.update(correct, statistics)
        policy = getattr(self.hparams, "reinit_policy", None)
        if stage == sb.Stage.TRAIN and policy is not None:
            policy.observe(statistics, targets.shape[0])
        return loss

    def on_fit_batch_start(self, batch, should_step):
        progress = self.progress()
        warmup = getattr(self.hparams, "margin_warmup", None)
        if warmup is not None:
            warmup.step(self.hparams.objective, progress)
        learning_rate = self.hparams.lr_schedule(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate * group.get("lr_multiplier", 1.0)

    def on_stage_start(self, stage, epoch=None):
        self.epoch_statistics = _EpochStatistics()

    def on_stage_end(self, stage, stage_loss, epoch=None):
        summary = {"loss": stage_loss, **self.epoch_statistics.summary()}
        if stage == sb.Stage.TRAIN:
            self.train_summary = summary
            policy = getattr(self.hparams, "reinit_policy", None)
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
                keep = max(1, int(getattr(self.hparams, "average_last", 1) or 1))
                self.checkpointer.save_and_keep_only(meta={"loss": stage_loss, "epoch": epoch}, num_to_keep=keep)

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
