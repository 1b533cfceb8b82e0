"""Extractors, and the model folders they come from.

* :mod:`spkver.models.extractors`: the front-ends (SpeechBrain's ``Fbank``, Kaldi's), spkver's
  extractors (ECAPA-TDNN, ResNet34), SpeechBrain backbones, the cosine classifier;
* :mod:`spkver.models.wespeaker`: WeSpeaker's architectures, and its model folders;
* :mod:`spkver.models.speechbrain`: SpeechBrain hub folders, read offline;
* :mod:`spkver.models.folders`: what a folder holds once read (:class:`StartingModel`);
* :mod:`spkver.models.layouts`: the layouts, ``build_extractor`` and ``load_model``.
"""
from spkver.models.extractors import (
    FRONTENDS,
    CosineClassifier,
    EmbeddingExtractor,
    FilterbankFrontend,
    KaldiFilterbank,
    ModelError,
    ecapa_tdnn,
    resnet34,
    speechbrain,
)
from spkver.models.folders import ModelFolderError, StartingModel
from spkver.models.layouts import (
    ARCHITECTURES,
    LAYOUTS,
    WHOLE_EXTRACTOR_ARCHITECTURES,
    build_extractor,
    layout_of,
    load_extractor,
    load_model,
)
from spkver.models.wespeaker import wespeaker_extractor

__all__ = ["ModelError", "ModelFolderError", "FilterbankFrontend", "KaldiFilterbank", "EmbeddingExtractor",
           "CosineClassifier", "StartingModel", "ecapa_tdnn", "resnet34", "speechbrain", "wespeaker_extractor",
           "ARCHITECTURES", "WHOLE_EXTRACTOR_ARCHITECTURES", "build_extractor", "LAYOUTS", "layout_of", "load_model",
           "load_extractor", "FRONTENDS"]
