"""Public model folders written in their published layouts, with random weights at their real sizes.

The tests write what ``huggingface-cli download`` or a WeSpeaker release leaves on disk, then load it
with spkver (and, for SpeechBrain, with SpeechBrain itself). ``seeded_state_dict`` builds weights from
a key -> shape table alone (no model code), so that the same weights can be rebuilt beside another
toolkit's model code: ``tests/data/wespeaker_reference.json`` holds, for each WeSpeaker architecture,
its state-dict keys and shapes and the embeddings WeSpeaker's own model code computes from these
weights (how it was made: docs/pretrained.md#how-the-references-were-made).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Sequence

import torch

REFERENCE = Path(__file__).resolve().parent / "data" / "wespeaker_reference.json"
#: The features every WeSpeaker reference embedding was computed from: torch.randn(FEATURES_SHAPE) at FEATURES_SEED.
FEATURES_SHAPE = (2, 150, 80)
FEATURES_SEED = 7


def seeded_state_dict(shapes: Dict[str, Sequence[int]], seed: int = 0) -> Dict[str, torch.Tensor]:
    """Deterministic weights for a key -> shape table, scaled so deep networks stay finite.

    Matrices and kernels: N(0, 1/fan_in); BatchNorm ``running_var``: 1 + |N(0, 0.1)|; ``num_batches_tracked``:
    0; other vectors (biases, BatchNorm weights and means): 0.1 N(0, 1) (+1 for BatchNorm ``weight`` ...
    recognised by a ``running_mean`` beside it). Keys are visited in sorted order from one generator.
    """
    generator = torch.Generator().manual_seed(seed)
    names = set(shapes)
    weights = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        prefix = key.rsplit(".", 1)[0] if "." in key else ""
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.zeros(shape, dtype=torch.long)
            continue
        noise = torch.randn(shape, generator=generator)
        if len(shape) >= 2:
            weights[key] = noise / math.sqrt(max(1, math.prod(shape[1:])))
        elif key.endswith("running_var"):
            weights[key] = 1.0 + 0.1 * noise.abs()
        elif key.endswith(".weight") and f"{prefix}.running_mean" in names:
            weights[key] = 1.0 + 0.1 * noise
        else:
            weights[key] = 0.1 * noise
    return weights


def reference_features() -> torch.Tensor:
    """The (2, 150, 80) features the WeSpeaker reference embeddings were computed from."""
    return torch.randn(FEATURES_SHAPE, generator=torch.Generator().manual_seed(FEATURES_SEED))


def wespeaker_references() -> dict:
    """name -> {"model", "model_args", "keys": {key: shape}, "embeddings": [[...], [...]]}."""
    return json.loads(REFERENCE.read_text())


# SpeechBrain hub folders, as `huggingface-cli download speechbrain/spkrec-ecapa-voxceleb` leaves them.
# The hyperparams files are the published ones (keys, values and comments; blank lines as published).

ECAPA_HUB_HYPERPARAMS = """\
# ############################################################################
# Model: ECAPA big for Speaker verification
# ############################################################################

# Feature parameters
n_mels: 80

# Pretrain folder (HuggingFace)
pretrained_path: speechbrain/spkrec-ecapa-voxceleb

# Output parameters
out_n_neurons: 7205

# Model params
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [1024, 1024, 1024, 1024, 3072]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: 192

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: 192
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""

# speechbrain/spkrec-resnet-voxceleb: its pretrainer loads neither the embedding mean nor the labels.
RESNET_HUB_HYPERPARAMS = """\
# ############################################################################
# Model: ResNet for Speaker verification
# ############################################################################

# Feature parameters
n_mels: 80

# Pretrain folder (HuggingFace)
pretrained_path: underdogliu1005/spkrec-resnet-voxceleb

# Output parameters
out_n_neurons: 7205

# Model params
compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: sentence
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ResNet.ResNet
    input_size: !ref <n_mels>
    channels: [128, 128, 256, 256]
    strides: [1, 2, 2, 2]
    block_sizes: [3, 4, 6, 3]
    lin_neurons: 256

classifier: !new:speechbrain.lobes.models.ResNet.Classifier
    input_size: 256
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>
<8 spaces>
label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

<8 spaces>
pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:
        embedding_model: !ref <embedding_model>
        classifier: !ref <classifier>
    paths:
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
""".replace("<8 spaces>", " " * 8)  # two lines of spaces alone, as published

VOXCELEB_CLASSES = 7205  # the hub models' out_n_neurons: VoxCeleb2 dev + VoxCeleb1 speakers


def write_speechbrain_hub_folder(folder: Path, kind: str = "ecapa", classes: int = VOXCELEB_CLASSES,
                                 seed: int = 0, channels: int = 1024) -> Path:
    """A hub folder with random weights at the real sizes: SpeechBrain's own modules, saved as its checkpointer does.

    ``channels`` (ECAPA only) below the published 1024 makes a smaller model in the same layout, for training.
    """
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
    from speechbrain.lobes.models.ECAPA_TDNN import Classifier as ECAPAClassifier
    from speechbrain.lobes.models.ResNet import Classifier as ResNetClassifier
    from speechbrain.lobes.models.ResNet import ResNet

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "ecapa":
        widths = [channels] * 4 + [3 * channels]
        backbone = ECAPA_TDNN(80, channels=widths, kernel_sizes=[5, 3, 3, 3, 1], dilations=[1, 2, 3, 4, 1],
                              attention_channels=128, lin_neurons=192)
        classifier, dim = ECAPAClassifier(192, out_neurons=classes), 192
        text = ECAPA_HUB_HYPERPARAMS.replace("[1024, 1024, 1024, 1024, 3072]", str(widths))
    else:
        backbone = ResNet(80, channels=[128, 128, 256, 256], strides=[1, 2, 2, 2], block_sizes=[3, 4, 6, 3],
                          lin_neurons=256)
        classifier, dim, text = ResNetClassifier(256, out_neurons=classes), 256, RESNET_HUB_HYPERPARAMS
    # Trained BatchNorm statistics, not the fresh 0/1: a loader that skipped them would show.
    state = {key: (1.0 + 0.2 * torch.rand_like(value) if key.endswith("running_var")
                   else 0.1 * torch.randn_like(value) if key.endswith("running_mean") else value)
             for key, value in backbone.state_dict().items()}
    torch.save(state, folder / "embedding_model.ckpt")
    torch.save(classifier.state_dict(), folder / "classifier.ckpt")
    # mean_var_norm_emb.ckpt as the hub holds it (written by an older SpeechBrain: speaker dicts included).
    torch.save({"count": 1000, "glob_mean": 0.3 * torch.randn(dim), "glob_std": torch.ones(dim),
                "spk_dict_mean": {}, "spk_dict_std": {}, "spk_dict_count": {}}, folder / "mean_var_norm_emb.ckpt")
    labels = [f"'id{index:05d}' => {index}" for index in range(classes)]
    (folder / "label_encoder.txt").write_text("\n".join(labels + ["================", "'starting_index' => 0"]) + "\n")
    (folder / "hyperparams.yaml").write_text(text.replace("out_n_neurons: 7205", f"out_n_neurons: {classes}"))
    (folder / "config.json").write_text('{"speechbrain_interface": "SpeakerRecognition"}\n')
    return folder


def write_wespeaker_folder(folder: Path, model: str, model_args: dict, classes: int = 5994,
                           weights_name: str = "avg_model.pt", seed: int = 0, shapes: dict = None) -> Path:
    """A WeSpeaker model folder: ``config.yaml`` (the training config, as WeSpeaker saves it) and the averaged
    state dict with the training head's ``projection.weight`` (classes x 3 rows: speed perturbation)."""
    import yaml

    from spkver.models.wespeaker import wespeaker_backbone

    folder.mkdir(parents=True, exist_ok=True)
    if shapes is None:
        shapes = {key: list(value.shape) for key, value in wespeaker_backbone(model, model_args).state_dict().items()}
    state = seeded_state_dict(shapes, seed)
    embed_dim = model_args.get("embed_dim", 256)
    state["projection.weight"] = torch.randn(3 * classes, embed_dim, generator=torch.Generator().manual_seed(seed))
    torch.save(state, folder / weights_name)
    config = {
        "model": model, "model_args": model_args, "model_init": None,
        "projection_args": {"project_type": "arc_margin", "scale": 32.0, "easy_margin": False},
        "dataset_args": {"resample_rate": 16000, "speed_perturb": True, "num_frms": 200, "aug_prob": 0.6,
                         "fbank_args": {"num_mel_bins": model_args.get("feat_dim", 80), "frame_shift": 10,
                                        "frame_length": 25, "dither": 1.0},
                         "spec_aug": False, "shuffle": True},
        "num_epochs": 150, "exp_dir": f"exp/{model}", "gpus": [0, 1], "log_batch_interval": 100,
        "margin_scheduler": "MarginScheduler",
        "margin_update": {"initial_margin": 0.0, "final_margin": 0.2, "increase_start_epoch": 20,
                          "fix_start_epoch": 40, "update_margin": True, "increase_type": "exp"},
        "optimizer": "SGD", "optimizer_args": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0001},
        "scheduler": "ExponentialDecrease",
        "scheduler_args": {"initial_lr": 0.1, "final_lr": 5.0e-05, "warm_up_epoch": 6, "warm_from_zero": False},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


# Hugging Face folders as `huggingface-cli download` leaves them (config.json, model.safetensors,
# preprocessor_config.json), at tiny sizes for training in the suite; save_pretrained writes the layout.

def write_tiny_wavlm(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A WavLM folder of ``layers`` transformer layers of width ``hidden`` (random weights)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.WavLMConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                      intermediate_size=2 * hidden, conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3),
                                      conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=100)
    transformers.WavLMModel(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return folder


def write_tiny_w2vbert(folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A w2v-BERT 2.0 folder of ``layers`` conformer layers of width ``hidden``, with its feature extractor."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Wav2Vec2BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                             intermediate_size=2 * hidden, conv_depthwise_kernel_size=5,
                                             left_max_position_embeddings=8, right_max_position_embeddings=4)
    transformers.Wav2Vec2BertModel(config).save_pretrained(folder)
    transformers.SeamlessM4TFeatureExtractor().save_pretrained(folder)
    return folder
