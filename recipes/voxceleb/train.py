#!/usr/bin/env python3
"""Train a speaker-embedding extractor with an alpha-divergence (or baseline) objective, then score.

    python recipes/voxceleb/train.py hparams/ecapa512_qmargin.yaml --data_folder=/data/voxceleb1 \
        --vox2_folder=/data/voxceleb2 [--number_of_epochs=40] [--device=cuda] [--precision=bf16]

Stages, each restartable: (1) synthesise the corpus if the hparams ask for it and it is missing,
(2) prepare manifests unless present, (3) train (resuming from the last checkpoint), (4) evaluate:
spkver.evaluation.evaluate_model, the stage `spkver evaluate --model <output_folder>` runs again
(average the last `average_last` epochs' extractors, subtract the training mean, score every trial
list as cosine, AS-norm and calibrated LLRs, write results.md/json, cohort.npz, calibration.json,
the model card and evaluation.json).
Multi-process: torchrun --nproc_per_node=N recipes/voxceleb/train.py ... (DDP: NCCL on GPUs, gloo on
CPUs; rank 0 alone prepares, checkpoints, evaluates and writes; docs/recipes.md#multi-process-training).
Fine-tuning: --init_from=FOLDER (any model folder spkver reads: a spkver experiment or export, a
SpeechBrain hub folder, a WeSpeaker folder) starts from its extractor, and from its prototypes when it
trained on the same speakers, else from the training speakers' class means (hparams/finetune/).
A data_folder that holds prepared manifests (spkver prepare ... --out DATA) is used as it is.
"""
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import speechbrain as sb
import torch

import spkver  # noqa: F401  (first: checks that torch, torchaudio and SpeechBrain match before they load)
from spkver import distributed
from spkver.brain import BrainSettings, SpeakerBrain
from spkver.data.datasets import speaker_datasets
from spkver.data.synth import synthesize_corpus
from spkver.data.voxceleb import prepare_voxceleb
from spkver.errors import UserError, format_user_error
from spkver.evaluation import EvaluationSettings, evaluate_model, score_before_training
from spkver.finetune import ONE_HOT_WARNING, PROTOTYPE_STARTS, initialise_from, one_hot_fraction, zero_loss_lead
from spkver.hparams import HparamsError, load, path_list
from spkver.losses import EngineError, StreamingSparseHead
from spkver.models import CosineClassifier
from spkver.scoring import ScoringError, read_trials

logger = logging.getLogger(__name__)


def check_settings(hparams, hparams_file, device="cpu"):
    """The user errors that can be caught before anything is written: one line naming the value."""
    try:
        BrainSettings.from_hparams(hparams)
    except HparamsError as error:
        raise HparamsError(f"{hparams_file}: {error}") from None
    try:
        hparams["objective"].check_engine(device)
    except EngineError as error:
        raise HparamsError(f"loss_engine: {error}") from None
    if hparams["head"] not in ("dense", "streaming"):
        raise HparamsError(f"{hparams_file}: head must be 'dense' or 'streaming', got {hparams['head']!r}")
    if hparams["head"] == "streaming":
        try:
            StreamingSparseHead.check_objective(hparams["objective"])
        except ValueError as error:
            raise HparamsError(f"head: {error}") from None
    hparams["trial_lists"] = path_list(hparams["trial_lists"], "trial_lists")
    manifests = Path(hparams["manifest_folder"])
    if manifests == Path(hparams["data_folder"]) and not (manifests / "counts.json").exists():
        raise HparamsError(f"data_folder: {manifests} holds no prepared corpus (counts.json): prepare it first with "
                           f"spkver prepare folder|kaldi|cnceleb|voxceleb ... --out {manifests}")
    if not hparams["synthetic_corpus"] and not Path(hparams["data_folder"]).is_dir():
        raise HparamsError(f"data_folder: {hparams['data_folder']} is not a folder (a VoxCeleb1 layout with wav/)")
    if hparams["vox2_folder"] is not None and not Path(hparams["vox2_folder"]).is_dir():
        raise HparamsError(f"vox2_folder: {hparams['vox2_folder']} is not a folder (VoxCeleb2 dev with aac/ or wav/)")
    if hparams["init_from"] is not None and not Path(hparams["init_from"]).is_dir():
        raise HparamsError(f"init_from: {hparams['init_from']} is not a folder (an experiment or exported model)")
    if hparams["init_prototypes"] not in PROTOTYPE_STARTS:
        raise HparamsError(f"init_prototypes must be one of {', '.join(PROTOTYPE_STARTS)}, got "
                           f"{hparams['init_prototypes']!r}")


def check_trial_lists(paths):
    """Every trial list is readable and well formed before training, not only when scoring after it."""
    for path in paths:
        try:
            read_trials(path)
        except ScoringError as error:
            raise HparamsError(f"trial_lists: {error}") from None


def prepare(hparams):
    """Synthesise the corpus (when asked and missing) and write the manifests (when missing), on rank 0.

    What is missing is decided on rank 0 alone: a rank that looked after rank 0 had written
    would skip the barrier that rank 0 waits at.
    """
    data_folder = Path(hparams["data_folder"])
    manifests = Path(hparams["manifest_folder"])

    def synthesise_and_prepare():
        if hparams["synthetic_corpus"] and not (data_folder / "wav").exists():
            synthesize_corpus(data_folder, **hparams["synthetic_corpus"])
        check_trial_lists(hparams["trial_lists"])
        if not (manifests / "counts.json").exists():
            prepare_voxceleb(manifests, vox1=data_folder, vox2=hparams["vox2_folder"], trials=hparams["trial_lists"],
                             train_on=hparams["train_on"], chunk_seconds=hparams["chunk_seconds"],
                             valid_fraction=hparams["valid_fraction"],
                             calibration_speakers=hparams["calibration_speakers"])

    sb.utils.distributed.run_on_main(synthesise_and_prepare)


def report_one_hot_fraction(brain, hparams, train_set):
    """Before the first fine-tuning step: how many training examples have nothing left to learn."""
    loader = sb.dataio.dataloader.make_dataloader(train_set, batch_size=hparams["batch_size"], shuffle=True)
    fraction = one_hot_fraction(brain.modules.embedding_model, brain.modules.classifier.weight.detach(),
                                hparams["objective"], loader, device=brain.device,
                                max_examples=hparams["one_hot_examples"])
    message = (f"{100 * fraction:.1f} % of training examples are already one-hot (zero loss, zero gradient) "
               f"under {hparams['objective']!r} at the starting point")
    if fraction > ONE_HOT_WARNING:
        logger.warning(f"{message}: above {100 * ONE_HOT_WARNING:.0f} %, fine-tuning will starve for gradient "
                       "(a larger margin, or a smaller alpha, gives those examples a loss again)")
    else:
        logger.info(message)
    lead = zero_loss_lead(hparams["objective"])
    if lead is not None:
        (logger.warning if lead[0] > 1.0 else logger.info)(lead[1])


def main():
    hparams_file, run_opts, overrides = sb.parse_arguments(sys.argv[1:])
    backend_note = None
    if "RANK" in os.environ:  # launched by torchrun
        run_opts, backend_note = distributed.choose_backend(run_opts)
    sb.utils.distributed.ddp_init_group(run_opts)  # a no-op unless launched by torchrun
    hparams, composed = load(hparams_file, overrides)
    check_settings(hparams, hparams_file, run_opts.device)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as resolved:
        resolved.write(composed)
    sb.create_experiment_directory(experiment_directory=hparams["output_folder"],
                                   hyperparams_to_save=resolved.name, overrides=overrides)
    if backend_note:
        logger.info(backend_note)
    prepare(hparams)
    # With speed perturbation every non-unit speed is a class of its own: the head has speakers x speeds.
    train_set, valid_set, num_speakers = speaker_datasets(hparams["manifest_folder"], hparams["crop_seconds"],
                                                          speed_perturb=hparams["speed_perturb"])
    embedding_dim = hparams["embedding_model"].embedding_dim
    if hparams["head"] == "streaming":  # the exact sparse head: no (batch, speakers) cosines
        # Under DDP its prototypes are sharded by class over the ranks (model parallel, as Partial FC).
        group = torch.distributed.group.WORLD if distributed.is_distributed() else None
        classifier = StreamingSparseHead(num_speakers, embedding_dim, hparams["objective"],
                                         chunk_size=hparams["streaming_chunk_size"],
                                         candidates=hparams["streaming_candidates"], sparse_gradient=False,
                                         process_group=group)
    else:
        classifier = CosineClassifier(embedding_dim, num_speakers)
    hparams["checkpointer"].add_recoverable("classifier", classifier)
    fine_tuning = hparams["init_from"] is not None and not hparams["checkpointer"].list_checkpoints()
    if fine_tuning:  # a fresh start from a trained extractor (a resumed run has its own checkpoint)
        speakers = json.loads((Path(hparams["manifest_folder"]) / "speakers.json").read_text())
        device = torch.device(run_opts.get("device") or "cpu")
        hparams["embedding_model"].to(device)  # the class means are one pass of the starting extractor
        loader = sb.dataio.dataloader.make_dataloader(train_set, batch_size=hparams["batch_size"], shuffle=True)
        logger.info(initialise_from(hparams["init_from"], hparams["embedding_model"], classifier, speakers,
                                    hparams["init_prototypes"], loader, device, hparams["prototype_init_examples"]))
    brain = SpeakerBrain(modules={"embedding_model": hparams["embedding_model"], "classifier": classifier},
                         opt_class=hparams["opt_class"], hparams=hparams, run_opts=run_opts,
                         checkpointer=hparams["checkpointer"])
    if fine_tuning:
        report_one_hot_fraction(brain, hparams, train_set)
    # Evaluation and everything written after training are rank 0's; the other ranks wait for it.
    settings = EvaluationSettings.from_hparams(hparams)
    before = None
    if hparams["evaluate_before_training"] and not hparams["checkpointer"].list_checkpoints():
        if distributed.rank() == 0:
            before = score_before_training(brain.extractor, settings, device=brain.device)
        distributed.barrier()
    brain.fit(hparams["epoch_counter"], train_set, valid_set,
              train_loader_kwargs=hparams["train_dataloader_options"],
              valid_loader_kwargs=hparams["valid_dataloader_options"])
    if distributed.rank() == 0:  # the same stage as `spkver evaluate --model <output_folder>`
        evaluate_model(hparams["output_folder"], brain.extractor, settings, device=brain.device,
                       before_training=before)
    distributed.barrier()


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # the user's input, named: one line; anything else keeps its traceback
        print(format_user_error(Path(sys.argv[0]).name, error), file=sys.stderr)
        sys.exit(2)
