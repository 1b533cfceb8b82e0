r"""Self-supervised front-ends (WavLM, w2v-BERT 2.0) from local Hugging Face folders, with MHFA and MFA back-ends.

The papers' strongest speaker systems fine-tune a self-supervised encoder under a light back-end
that reads *every* hidden state: the input of the first transformer layer and each layer's output.

* :class:`SSLEncoder` -- ``transformers``' ``WavLMModel`` or ``Wav2Vec2BertModel`` (with its own
  feature extractor, ``SeamlessM4TFeatureExtractor``: 80 Kaldi filterbanks stacked in pairs), built
  from a folder as ``huggingface-cli download`` leaves it (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``; never a download), returning the hidden states ``(B, D, T, L+1)``. Options:
  the convolutional feature encoder frozen, layer drop (a skipped layer passes its input on, so the
  back-end always sees L+1 states), gradient checkpointing, bf16 autocast, and LoRA adapters through
  ``peft`` (w2v-BERT: r = 64, alpha = 128 on ``linear_q`` and ``linear_v``).
* :class:`MHFA` -- multi-head factorised attentive pooling (Peng et al., SLT 2022), with the reference
  implementation's parameter names, so its checkpoints load: keys and values are two softmax-weighted
  sums of the layers, compressed to ``compression_dim``; each head attends over time with the keys and
  pools the values; the heads' pooled values, concatenated, go through ``pooling_fc``:

  .. math::
      k_t = W_k \sum_l \mathrm{softmax}(w^k)_l\, h_{t,l}, \quad
      v_t = W_v \sum_l \mathrm{softmax}(w^v)_l\, h_{t,l}, \quad
      a_{t,h} = \mathrm{softmax}_t (A k_t)_h, \quad
      e = F\,[\textstyle\sum_t a_{t,1} v_t; \dots; \sum_t a_{t,H} v_t].

* :class:`MFA` -- multi-layer feature aggregation (WeSpeaker's w2v-BERT back-end): a small adapter
  per hidden state (Linear, LayerNorm, ReLU, Linear to 128), the adapters' outputs concatenated into
  attentive statistics pooling and a linear layer to 256.

``transformers``, ``peft`` and ``safetensors`` are the ``ssl`` extra (``pip install 'spkver[ssl]'``),
imported only here, when an SSL model is built; without them that is one :class:`ModelError` line.

>>> backend = MHFA(head_nb=4, inputs_dim=32, compression_dim=8, outputs_dim=16, nb_layer=3)
>>> backend(torch.randn(2, 32, 50, 3)).shape
torch.Size([2, 16])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from spkver.models.extractors import ModelError

__all__ = ["MHFA", "MFA", "SSLEncoder", "SSLExtractor", "ssl_extractor", "ssl_extractor_from_folder", "ENCODERS",
           "BACKENDS"]

#: spkver's names of the encoders -> transformers' model and config classes, and LoRA's default targets.
ENCODERS = {
    "wavlm": ("WavLMModel", "WavLMConfig", ["feed_forward.intermediate_dense", "feed_forward.output_dense"]),
    "w2v-bert": ("Wav2Vec2BertModel", "Wav2Vec2BertConfig", ["linear_q", "linear_v"]),
}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError("SSL models need the ssl extra (transformers, peft, safetensors): "
                         "pip install 'spkver[ssl]'") from None
    transformers.utils.logging.disable_progress_bar()  # one bar per weight file is noise in a recipe's log
    return transformers


class MHFA(nn.Module):
    """Multi-head factorised attentive pooling: hidden states ``(B, D, T, L)`` -> embeddings ``(B, outputs_dim)``."""

    def __init__(self, head_nb: int = 64, inputs_dim: int = 768, compression_dim: int = 128, outputs_dim: int = 256,
                 nb_layer: int = 13):
        super().__init__()
        self.weights_k = nn.Parameter(torch.ones(nb_layer))
        self.weights_v = nn.Parameter(torch.ones(nb_layer))
        self.cmp_linear_k = nn.Linear(inputs_dim, compression_dim)
        self.cmp_linear_v = nn.Linear(inputs_dim, compression_dim)
        self.att_head = nn.Linear(compression_dim, head_nb)
        self.pooling_fc = nn.Linear(head_nb * compression_dim, outputs_dim)
        self.embedding_dim = outputs_dim

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        keys = self.cmp_linear_k((hidden * F.softmax(self.weights_k, dim=-1)).sum(-1).transpose(1, 2))
        values = self.cmp_linear_v((hidden * F.softmax(self.weights_v, dim=-1)).sum(-1).transpose(1, 2))
        attention = F.softmax(self.att_head(keys), dim=1)                   # (B, T, H): over time, per head
        pooled = torch.einsum("bth,btc->bhc", attention, values)            # (B, H, C)
        return self.pooling_fc(pooled.reshape(pooled.shape[0], -1))


class _AttentiveStatistics(nn.Module):
    """Per-channel attentive mean and standard deviation over time (WeSpeaker's ASP)."""

    def __init__(self, channels: int, hidden: int = 128):
        super().__init__()
        self.attention = nn.Sequential(nn.Conv1d(channels, hidden, 1), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden),
                                       nn.Conv1d(hidden, channels, 1), nn.Softmax(dim=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.attention(x)
        mean = (x * weights).sum(2)
        std = ((x * x * weights).sum(2) - mean * mean).clamp_min(1e-5).sqrt()
        return torch.cat([mean, std], dim=1)


class MFA(nn.Module):
    """Multi-layer feature aggregation: hidden states ``(B, D, T, L)`` -> embeddings ``(B, embed_dim)``."""

    def __init__(self, inputs_dim: int = 1024, nb_layer: int = 25, adapter_dim: int = 128, embed_dim: int = 256):
        super().__init__()
        self.adapter_layers = nn.ModuleList([
            nn.Sequential(nn.Linear(inputs_dim, adapter_dim), nn.LayerNorm(adapter_dim), nn.ReLU(inplace=True),
                          nn.Linear(adapter_dim, adapter_dim)) for _ in range(nb_layer)])
        self.pooling = _AttentiveStatistics(adapter_dim * nb_layer, adapter_dim)
        self.bottleneck = nn.Linear(2 * adapter_dim * nb_layer, embed_dim)
        self.embedding_dim = embed_dim

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        layers = hidden.permute(3, 0, 2, 1)                                 # (L, B, T, D)
        adapted = torch.cat([adapter(layer) for adapter, layer in zip(self.adapter_layers, layers)], dim=-1)
        return self.bottleneck(self.pooling(adapted.transpose(1, 2)))


BACKENDS = {"mhfa": MHFA, "mfa": MFA}


class SSLEncoder(nn.Module):
    """A Hugging Face speech encoder returning all its hidden states ``(B, D, T, L+1)`` for 16 kHz audio ``(B, S)``.

    ``config``: the model's ``config.json`` (as a dict); ``preprocessor``: its ``preprocessor_config.json``
    (the w2v-BERT feature extractor's settings; WavLM's ``do_normalize``). Built with random weights;
    :func:`ssl_extractor_from_folder` loads a folder's.
    """

    def __init__(self, encoder: str, config: dict, preprocessor: Optional[dict] = None,
                 freeze_feature_encoder: bool = True, freeze_encoder: bool = False, layerdrop: float = 0.0,
                 gradient_checkpointing: bool = False, bf16: bool = False, lora: Optional[dict] = None):
        super().__init__()
        if encoder not in ENCODERS:
            raise ModelError(f"unknown SSL encoder {encoder!r}; known: {', '.join(ENCODERS)}")
        transformers = _transformers()
        model_class, config_class, _ = ENCODERS[encoder]
        settings = {**config, "layerdrop": layerdrop, "apply_spec_augment": False}
        self.model = getattr(transformers, model_class)(getattr(transformers, config_class).from_dict(settings))
        self.encoder, self.preprocessor, self.bf16 = encoder, dict(preprocessor or {}), bf16
        self.hidden_size = self.model.config.hidden_size
        self.num_states = self.model.config.num_hidden_layers + 1
        self.features = None
        if encoder == "w2v-bert":
            self.features = transformers.SeamlessM4TFeatureExtractor(**{
                key: value for key, value in self.preprocessor.items()
                if key not in ("feature_extractor_type", "processor_class")})
        self._freeze(freeze_feature_encoder, freeze_encoder)
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable()  # transformers 5 (gradient_checkpointing_enable: an alias)
        self.lora = None
        if lora:
            self.add_lora(lora)

    def add_lora(self, lora: dict) -> None:
        """Wrap the encoder with LoRA adapters (``lora``: peft's ``LoraConfig`` arguments over spkver's defaults);
        peft freezes the encoder's own weights."""
        from peft import LoraConfig, get_peft_model

        self.lora = {"r": 64, "lora_alpha": 128, "lora_dropout": 0.0, "target_modules": ENCODERS[self.encoder][2],
                     **lora}
        self.model = get_peft_model(self.model, LoraConfig(bias="none", **self.lora))

    def _freeze(self, feature_encoder: bool, everything: bool) -> None:
        frozen = list(self.model.parameters()) if everything else []
        if feature_encoder and not everything:
            part = self.model.feature_extractor if self.encoder == "wavlm" else self.model.feature_projection
            frozen = list(part.parameters())
        for parameter in frozen:
            parameter.requires_grad_(False)

    def _inputs(self, waveforms: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.features is None:  # WavLM: the raw waveform (normalised per utterance when its folder says so)
            if self.preprocessor.get("do_normalize", False):
                waveforms = (waveforms - waveforms.mean(1, keepdim=True)) / (waveforms.std(1, keepdim=True) + 1e-7)
            return {"input_values": waveforms}
        batch = self.features([w.detach().cpu().float().numpy() for w in waveforms], sampling_rate=16000,
                              return_tensors="pt", padding=True)
        return {"input_features": batch["input_features"].to(waveforms.device),
                "attention_mask": batch["attention_mask"].to(waveforms.device)}

    def layers(self) -> List[nn.Module]:
        base = self.model.get_base_model() if self.lora else self.model
        return list(base.encoder.layers)

    def forward(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        layers = self.layers()
        inputs: Dict[int, torch.Tensor] = {}
        outputs: Dict[int, torch.Tensor] = {}

        def keep_input(index):
            def hook(module, args, kwargs):
                inputs[index] = args[0] if args else kwargs["hidden_states"]
            return hook

        def keep_output(index):
            def hook(module, args, kwargs, output):
                outputs[index] = output[0] if isinstance(output, (tuple, list)) else output
            return hook

        handles = [layer.register_forward_pre_hook(keep_input(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles += [layer.register_forward_hook(keep_output(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            with torch.autocast(waveforms.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                result = self.model(**self._inputs(waveforms))
        finally:
            for handle in handles:
                handle.remove()
        ran = sorted(inputs)
        state = inputs[ran[0]] if ran else result.last_hidden_state
        states = [state]
        for index in range(len(layers)):  # a layer skipped by layer drop passes its input on
            state = outputs.get(index, state)
            states.append(state)
        return torch.stack(states, dim=-1).float().transpose(1, 2)          # (B, D, T, L+1)


class SSLExtractor(nn.Module):
    """An SSL encoder and its back-end: 16 kHz waveforms ``(B, S)`` -> embeddings ``(B, D)``.

    ``frontend`` is the encoder, ``backbone`` the back-end (the names the rest of spkver uses for
    every extractor's two parts); ``parameter_groups`` names them for per-group learning rates.
    """

    def __init__(self, frontend: SSLEncoder, backbone: nn.Module, spec: dict):
        super().__init__()
        self.frontend, self.backbone, self.spec = frontend, backbone, spec
        self.embedding_dim = backbone.embedding_dim

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"encoder": [p for p in self.frontend.parameters() if p.requires_grad],
                "backend": list(self.backbone.parameters())}

    def forward(self, waveforms: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.backbone(self.frontend(waveforms, lengths))

    def merged(self) -> "SSLExtractor":
        """A copy with the LoRA adapters merged into the encoder's weights (the extractor itself without LoRA)."""
        if not self.frontend.lora:
            return self
        import copy

        spec = {key: value for key, value in self.spec.items() if key != "architecture"}
        merged = ssl_extractor(**{**spec, "lora": None})
        merged.frontend.model.load_state_dict(copy.deepcopy(self.frontend.model).merge_and_unload().state_dict())
        merged.backbone.load_state_dict(self.backbone.state_dict())
        return merged


def ssl_extractor(encoder: str, config: dict, backend: str, backend_args: Optional[dict] = None,
                  preprocessor: Optional[dict] = None, options: Optional[dict] = None,
                  lora: Optional[dict] = None) -> SSLExtractor:
    """An SSL extractor with random weights from its spec (a folder's config, the back-end and the options)."""
    options = dict(options or {})
    frontend = SSLEncoder(encoder, config, preprocessor, lora=lora, **options)
    if backend not in BACKENDS:
        raise ModelError(f"unknown SSL back-end {backend!r}; known: {', '.join(BACKENDS)}")
    arguments = {"mhfa": {"inputs_dim": frontend.hidden_size, "nb_layer": frontend.num_states},
                 "mfa": {"inputs_dim": frontend.hidden_size, "nb_layer": frontend.num_states}}[backend]
    backbone = BACKENDS[backend](**{**arguments, **(backend_args or {})})
    spec = {"architecture": "ssl", "encoder": encoder, "config": config, "backend": backend,
            "backend_args": dict(backend_args or {}), "preprocessor": dict(preprocessor or {}), "options": options,
            "lora": frontend.lora}
    return SSLExtractor(frontend, backbone, spec)


def ssl_extractor_from_folder(folder, encoder: str, backend: str = "mhfa", backend_args: Optional[dict] = None,
                              lora: Optional[dict] = None, **options) -> SSLExtractor:
    """An SSL extractor whose encoder has the weights of a local Hugging Face folder (``config.json`` and
    ``model.safetensors`` or ``pytorch_model.bin``; ``preprocessor_config.json`` when present); the back-end
    starts at random. Nothing is downloaded.

    ``options``: ``freeze_feature_encoder``, ``freeze_encoder``, ``layerdrop``, ``gradient_checkpointing``,
    ``bf16`` (:class:`SSLEncoder`).
    """
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ModelError(f"{folder}: no config.json: not a Hugging Face model folder")
    if not any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ModelError(f"{folder}: no model.safetensors or pytorch_model.bin beside config.json")
    config = json.loads((folder / "config.json").read_text())
    preprocessor = (json.loads((folder / "preprocessor_config.json").read_text())
                    if (folder / "preprocessor_config.json").exists() else {})
    extractor = ssl_extractor(encoder, config, backend, backend_args, preprocessor, options, lora=None)
    model_class = getattr(_transformers(), ENCODERS[encoder][0])
    pretrained = model_class.from_pretrained(str(folder), local_files_only=True)
    try:
        extractor.frontend.model.load_state_dict(pretrained.state_dict(), strict=True)
    except RuntimeError as error:
        raise ModelError(f"{folder}: its weights do not fit its config.json ({str(error).splitlines()[0]})") from None
    if lora:
        extractor.frontend.add_lora(lora)
        extractor.spec["lora"] = extractor.frontend.lora
    return extractor
