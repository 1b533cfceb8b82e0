r"""WeSpeaker's extractors, written for spkver, so that WeSpeaker's published model folders load strictly.

A WeSpeaker model folder holds ``config.yaml`` (``model``, ``model_args``) and ``avg_model.pt`` (or
``avg_model``): the state dict of the averaged model, with the training head's ``projection.weight``
(speakers x 3 rows when trained with speed perturbation). The architectures here use WeSpeaker's
parameter names, so those state dicts load with ``strict=True`` once the projection is set aside;
``tests/test_wespeaker.py`` holds every listed architecture to embeddings computed by WeSpeaker's
own model code from the same weights (``tests/data/wespeaker_reference.json``).

Front-end, as WeSpeaker's CLI applies it: the waveform scaled to int16 range, Kaldi filterbanks
(80 bins, 25 ms Hamming windows every 10 ms, no dither), then each utterance's mean over time
subtracted: :class:`~spkver.models.extractors.FilterbankFrontend` of kind ``"kaldi"``.

Architectures (input features ``(B, T, F)``, output embeddings ``(B, D)``):

* ``ResNet18/34`` (basic blocks 2-2-2-2, 3-4-6-3) and ``ResNet50/101/152/221/293`` (bottlenecks,
  expansion 4): a 3x3 stem of ``m_channels`` = 32, four stages of widths 32-64-128-256 (times the
  expansion), strides 1-2-2-2 over frequency and time, then a pooling over time of the
  ``(channels x F/8)`` frame vectors and ``seg_1`` (and, with ``two_emb_layer``, ReLU, a
  non-affine BatchNorm and ``seg_2``, whose output is the embedding).
* ``ECAPA_TDNN_c512/c1024`` and the ``GLOB`` variants (the attention sees each channel's mean and
  standard deviation over the utterance): WeSpeaker's ECAPA, which differs from SpeechBrain's
  (ReLU before BatchNorm, Res2 scale 8, a 1536-channel aggregation whatever C is).
* Poolings: ``TSTP`` (mean and unbiased standard deviation over time), ``ASTP`` (attentive
  statistics), ``MQMHASTP`` (multi-query multi-head attentive statistics, 2 queries x 8 heads).

>>> model = wespeaker_backbone("ResNet34", {"feat_dim": 80, "embed_dim": 256})
>>> model(torch.randn(2, 200, 80)).shape
torch.Size([2, 256])
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from spkver.models.extractors import EmbeddingExtractor, FilterbankFrontend, ModelError

__all__ = ["WeSpeakerResNet", "WeSpeakerECAPA", "wespeaker_backbone", "wespeaker_extractor", "WESPEAKER_MODELS",
           "POOLINGS", "read_wespeaker_folder"]

_STD_FLOOR = 1e-7


# Poolings: (B, D, T) frame vectors (ResNets' (B, C, F, T) flattened to D = C x F) -> (B, out_dim).

def _flatten_frames(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _weighted_statistics(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    mean = (weights * x).sum(-1)
    std = ((weights * x * x).sum(-1) - mean * mean).clamp_min(_STD_FLOOR).sqrt()
    return torch.cat([mean, std], dim=1)


class TSTP(nn.Module):
    r"""Temporal statistics: :math:`[\mu, \sqrt{\sigma^2 + 10^{-7}}]` over time, :math:`\sigma^2` unbiased."""

    def __init__(self, in_dim: int, **_ignored):
        super().__init__()
        self.out_dim = 2 * in_dim

    def forward(self, x):
        x = _flatten_frames(x)
        return torch.cat([x.mean(-1), (x.var(-1) + _STD_FLOOR).sqrt()], dim=1)


class ASTP(nn.Module):
    r"""Attentive statistics: :math:`a = \mathrm{softmax}_t(W_2 \tanh(W_1 x_t))` per channel, weighted mean and std.

    With ``global_context_att`` the attention also sees each channel's utterance mean and std.
    """

    def __init__(self, in_dim: int, bottleneck_dim: int = 128, global_context_att: bool = False, **_ignored):
        super().__init__()
        self.global_context_att = global_context_att
        self.linear1 = nn.Conv1d(in_dim * (3 if global_context_att else 1), bottleneck_dim, kernel_size=1)
        self.linear2 = nn.Conv1d(bottleneck_dim, in_dim, kernel_size=1)
        self.out_dim = 2 * in_dim

    def forward(self, x):
        x = _flatten_frames(x)
        context = x
        if self.global_context_att:
            mean = x.mean(-1, keepdim=True).expand_as(x)
            std = (x.var(-1, keepdim=True) + _STD_FLOOR).sqrt().expand_as(x)
            context = torch.cat([x, mean, std], dim=1)
        weights = torch.softmax(self.linear2(torch.tanh(self.linear1(context))), dim=-1)
        return _weighted_statistics(x, weights)


class _MultiHeadAttentiveStatistics(nn.Module):
    """One query of MQMHASTP: the channels split into heads, each head its own attention over time."""

    def __init__(self, in_dim: int, layer_num: int, head_num: int, d_s: int, bottleneck_dim: int):
        super().__init__()
        if in_dim % head_num:
            raise ModelError(f"MQMHASTP: {in_dim} channels do not split into {head_num} heads")
        head_dim = in_dim // head_num
        widths = [head_dim] + [bottleneck_dim] * (layer_num - 1) + [head_dim if d_s > 1 else 1]
        heads = []
        for _ in range(head_num):
            layers = nn.Sequential()
            for index in range(layer_num):
                layers.add_module(f"att_{index}", nn.Conv1d(widths[index], widths[index + 1], 1, 1))
                if index < layer_num - 1:
                    layers.add_module(f"tanh{index}", nn.Tanh())
            heads.append(layers)
        self.heads_att_trans = nn.ModuleList(heads)

    def forward(self, x):
        chunks = torch.chunk(x, len(self.heads_att_trans), dim=1)
        return torch.cat([_weighted_statistics(chunk, torch.softmax(head(chunk), dim=-1))
                          for chunk, head in zip(chunks, self.heads_att_trans)], dim=1)


class MQMHASTP(nn.Module):
    """Multi-query multi-head attentive statistics pooling (Zhao et al. 2022): queries concatenated."""

    def __init__(self, in_dim: int, layer_num: int = 2, query_num: int = 2, head_num: int = 8, d_s: int = 2,
                 bottleneck_dim: int = 64, **_ignored):
        super().__init__()
        self.n_query = nn.ModuleList([_MultiHeadAttentiveStatistics(in_dim, layer_num, head_num, d_s, bottleneck_dim)
                                      for _ in range(query_num)])
        self.out_dim = 2 * in_dim * query_num

    def forward(self, x):
        x = _flatten_frames(x)
        return torch.cat([query(x) for query in self.n_query], dim=-1)


POOLINGS = {"TSTP": TSTP, "ASTP": ASTP, "MQMHASTP": MQMHASTP}


def _pooling(name: str, in_dim: int, **arguments) -> nn.Module:
    if name not in POOLINGS:
        raise ModelError(f"pooling_func {name!r} is not supported; supported: {sorted(POOLINGS)}")
    return POOLINGS[name](in_dim, **arguments)


# ResNets.

class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class WeSpeakerResNet(nn.Module):
    """WeSpeaker's ResNet: features ``(B, T, F)`` (``lengths`` accepted and unused) -> ``(B, embed_dim)``."""

    def __init__(self, block: str, num_blocks, m_channels: int = 32, feat_dim: int = 80, embed_dim: int = 256,
                 pooling_func: str = "TSTP", two_emb_layer: bool = False):
        super().__init__()
        block_class = {"basic": _BasicBlock, "bottleneck": _Bottleneck}[block]
        self.embedding_dim = embed_dim
        self.two_emb_layer = two_emb_layer
        self.conv1 = nn.Conv2d(1, m_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        in_planes = m_channels
        for stage, (count, stride) in enumerate(zip(num_blocks, (1, 2, 2, 2))):
            planes = m_channels * 2 ** stage
            blocks = []
            for index in range(count):
                blocks.append(block_class(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes * block_class.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.pool = _pooling(pooling_func, (feat_dim // 8) * m_channels * 8 * block_class.expansion)
        self.seg_1 = nn.Linear(self.pool.out_dim, embed_dim)
        if two_emb_layer:
            self.seg_bn_1 = nn.BatchNorm1d(embed_dim, affine=False)
            self.seg_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, features: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(features.transpose(1, 2)[:, None])))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        embedding = self.seg_1(self.pool(x))
        if self.two_emb_layer:
            embedding = self.seg_2(self.seg_bn_1(F.relu(embedding)))
        return embedding


# ECAPA-TDNN, WeSpeaker's variant.

class _ConvReluBatchNorm(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, 1, padding)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x):
        return self.bn(F.relu(self.conv(x)))


class _Res2ConvReluBatchNorm(nn.Module):
    """Res2Net's hierarchical convolution: ``scale`` channel groups, each after the first adds the previous."""

    def __init__(self, channels: int, kernel_size: int, padding: int, dilation: int, scale: int):
        super().__init__()
        self.width = channels // scale
        self.convs = nn.ModuleList([nn.Conv1d(self.width, self.width, kernel_size, 1, padding, dilation)
                                    for _ in range(scale - 1)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(self.width) for _ in range(scale - 1)])

    def forward(self, x):
        groups = torch.split(x, self.width, dim=1)
        outputs, previous = [], None
        for group, conv, bn in zip(groups, self.convs, self.bns):
            previous = bn(F.relu(conv(group if previous is None else previous + group)))
            outputs.append(previous)
        return torch.cat(outputs + [groups[-1]], dim=1)


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, bottleneck: int = 128):
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x):
        return x * torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))[:, :, None]


class _SERes2Block(nn.Module):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.se_res2block = nn.Sequential(_ConvReluBatchNorm(channels, channels),
                                          _Res2ConvReluBatchNorm(channels, 3, dilation, dilation, scale=8),
                                          _ConvReluBatchNorm(channels, channels),
                                          _SqueezeExcitation(channels))

    def forward(self, x):
        return x + self.se_res2block(x)


class WeSpeakerECAPA(nn.Module):
    """WeSpeaker's ECAPA-TDNN: features ``(B, T, F)`` (``lengths`` accepted and unused) -> ``(B, embed_dim)``."""

    def __init__(self, channels: int = 512, feat_dim: int = 80, embed_dim: int = 192, pooling_func: str = "ASTP",
                 global_context_att: bool = False, emb_bn: bool = False):
        super().__init__()
        self.embedding_dim = embed_dim
        self.layer1 = _ConvReluBatchNorm(feat_dim, channels, kernel_size=5, padding=2)
        self.layer2 = _SERes2Block(channels, dilation=2)
        self.layer3 = _SERes2Block(channels, dilation=3)
        self.layer4 = _SERes2Block(channels, dilation=4)
        aggregated = 512 * 3  # WeSpeaker's choice, whatever the channels
        self.conv = nn.Conv1d(channels * 3, aggregated, kernel_size=1)
        self.pool = _pooling(pooling_func, aggregated, global_context_att=global_context_att)
        self.bn = nn.BatchNorm1d(self.pool.out_dim)
        self.linear = nn.Linear(self.pool.out_dim, embed_dim)
        self.emb_bn = emb_bn
        if emb_bn:
            self.bn2 = nn.BatchNorm1d(embed_dim)

    def forward(self, features: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        out2 = self.layer2(self.layer1(features.transpose(1, 2)))
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        x = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        embedding = self.linear(self.bn(self.pool(x)))
        return self.bn2(embedding) if self.emb_bn else embedding


def _resnet(block: str, num_blocks):
    return lambda feat_dim=80, embed_dim=256, pooling_func="TSTP", two_emb_layer=False: WeSpeakerResNet(
        block, num_blocks, feat_dim=feat_dim, embed_dim=embed_dim, pooling_func=pooling_func,
        two_emb_layer=two_emb_layer)


def _ecapa(channels: int, global_context_att: bool):
    return lambda feat_dim=80, embed_dim=192, pooling_func="ASTP", emb_bn=False: WeSpeakerECAPA(
        channels, feat_dim, embed_dim, pooling_func, global_context_att, emb_bn)


#: WeSpeaker's model names (``config.yaml``'s ``model``) -> constructors taking its ``model_args``.
WESPEAKER_MODELS = {
    "ResNet18": _resnet("basic", (2, 2, 2, 2)),
    "ResNet34": _resnet("basic", (3, 4, 6, 3)),
    "ResNet50": _resnet("bottleneck", (3, 4, 6, 3)),
    "ResNet101": _resnet("bottleneck", (3, 4, 23, 3)),
    "ResNet152": _resnet("bottleneck", (3, 8, 36, 3)),
    "ResNet221": _resnet("bottleneck", (6, 16, 48, 3)),
    "ResNet293": _resnet("bottleneck", (10, 20, 64, 3)),
    "ECAPA_TDNN_c512": _ecapa(512, False),
    "ECAPA_TDNN_c1024": _ecapa(1024, False),
    "ECAPA_TDNN_GLOB_c512": _ecapa(512, True),
    "ECAPA_TDNN_GLOB_c1024": _ecapa(1024, True),
}


def wespeaker_backbone(model: str, model_args: dict) -> nn.Module:
    """The backbone named by a WeSpeaker ``config.yaml`` (``model``, ``model_args``)."""
    if model not in WESPEAKER_MODELS:
        raise ModelError(f"WeSpeaker model {model!r} is not supported; supported: {', '.join(WESPEAKER_MODELS)}")
    try:
        return WESPEAKER_MODELS[model](**model_args)
    except TypeError as error:
        raise ModelError(f"WeSpeaker {model}: model_args {model_args} do not fit ({error})") from None


def wespeaker_extractor(model: str, model_args: dict) -> EmbeddingExtractor:
    """One of WeSpeaker's extractors (``config.yaml``'s ``model`` and ``model_args``) with its Kaldi front-end.

    >>> wespeaker_extractor("ResNet34", {"feat_dim": 80, "embed_dim": 256}).embedding_dim
    256
    """
    n_mels = int(model_args.get("feat_dim", 80))
    backbone = wespeaker_backbone(model, model_args)
    spec = {"architecture": "wespeaker", "model": model, "model_args": dict(model_args)}
    return EmbeddingExtractor(backbone, backbone.embedding_dim, n_mels, spec,
                              frontend=FilterbankFrontend(n_mels, kind="kaldi"))


#: The weight files a WeSpeaker model folder may hold, in the order they are looked for.
WESPEAKER_WEIGHTS = ("avg_model.pt", "avg_model")


def read_wespeaker_folder(folder):
    """A WeSpeaker model folder: ``config.yaml`` and ``avg_model.pt`` (or ``avg_model``).

    The extractor loads strictly (every key but the projection's); ``projection.weight`` becomes the
    starting model's prototypes (without class names: WeSpeaker folders do not carry them).
    """
    from pathlib import Path

    import yaml

    from spkver.checkpoints import load_weights
    from spkver.models.folders import ModelFolderError, StartingModel, load_strictly

    folder = Path(folder)
    config_path = folder / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as error:
        raise ModelFolderError(f"{config_path}: not readable YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict) or "model" not in config or not isinstance(config.get("model_args"), dict):
        raise ModelFolderError(f"{config_path}: no 'model' and 'model_args' (WeSpeaker's model description)")
    dataset_args = config.get("dataset_args") or {}
    frontend = dataset_args.get("frontend", "fbank")
    if frontend != "fbank":
        raise ModelFolderError(f"{config_path}: dataset_args.frontend is {frontend!r}; spkver reads WeSpeaker's "
                               "filterbank models (frontend 'fbank')")
    bins = (dataset_args.get("fbank_args") or {}).get("num_mel_bins")
    feat_dim = config["model_args"].get("feat_dim")
    if bins is not None and feat_dim is not None and int(bins) != int(feat_dim):
        raise ModelFolderError(f"{config_path}: fbank_args.num_mel_bins {bins} differs from model_args.feat_dim "
                               f"{feat_dim}")
    try:
        extractor = wespeaker_extractor(config["model"], config["model_args"])
    except ModelError as error:
        raise ModelFolderError(f"{config_path}: {error}") from None
    path = next((folder / name for name in WESPEAKER_WEIGHTS if (folder / name).exists()), None)
    if path is None:
        raise ModelFolderError(f"{folder}: config.yaml without weights ({' or '.join(WESPEAKER_WEIGHTS)})")
    weights = load_weights(path)
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    load_strictly(extractor.backbone, weights, path, ignored_prefixes=("projection.",))
    return StartingModel(extractor, "WeSpeaker folder", folder, prototypes=weights.get("projection.weight"))
