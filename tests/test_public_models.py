"""Public models as they lie on disk: WeSpeaker folders and SpeechBrain hub folders, loaded strictly, offline.

Each folder is written in its published layout with random weights at the real sizes
(tests/layouts.py); SpeechBrain folders are loaded by SpeechBrain too, WeSpeaker architectures are held
to embeddings WeSpeaker's own model code computed (tests/data/wespeaker_reference.json).
"""
import shutil

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from spkver import cli
from spkver.inference import SpeakerEmbedder
from spkver.models import LAYOUTS, ModelFolderError, load_model
from spkver.models.wespeaker import wespeaker_backbone
from tests.layouts import (
    reference_features,
    seeded_state_dict,
    wespeaker_references,
    write_speechbrain_hub_folder,
    write_wespeaker_folder,
)

REFERENCES = {name: entry for name, entry in wespeaker_references().items() if not name.startswith("_")}


def _cosines(a, b) -> np.ndarray:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return F.cosine_similarity(a.double(), b.double(), dim=-1).numpy()


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_wespeaker_architectures_have_wespeakers_keys_and_embeddings(name):
    reference = REFERENCES[name]
    model = wespeaker_backbone(reference["model"], reference["model_args"]).eval()
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert shapes == reference["keys"]  # the published state dicts load strictly
    model.load_state_dict(seeded_state_dict(reference["keys"]), strict=True)
    with torch.no_grad():
        embeddings = model(reference_features())
    assert _cosines(embeddings, reference["embeddings"]).min() >= 0.9999
    assert sum(p.numel() for p in model.parameters()) == reference["parameters"]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Two 16 kHz int16 wave files of 2.5 s and 3.1 s (WeSpeaker's CLI reads them unnormalised)."""
    folder = tmp_path_factory.mktemp("speech")
    generator = np.random.default_rng(3)
    paths = []
    for index, seconds in enumerate((2.5, 3.1)):
        t = np.arange(int(16000 * seconds)) / 16000
        audio = 0.3 * np.sin(2 * np.pi * (140 + 40 * index) * t * (1 + 0.1 * np.sin(3 * t))) \
            + 0.05 * generator.standard_normal(t.size)
        path = folder / f"utterance{index}.wav"
        soundfile.write(path, audio.astype(np.float32), 16000, subtype="PCM_16")
        paths.append(path)
    return paths


def _wespeaker_cli_embedding(backbone, path) -> np.ndarray:
    """WeSpeaker's CLI, step by step: unnormalised int16 samples, Kaldi fbank (Hamming), CMN, the model."""
    import torchaudio.compliance.kaldi as kaldi

    samples, rate = soundfile.read(path, dtype="int16")
    pcm = torch.from_numpy(samples.astype(np.float32))[None]
    features = kaldi.fbank(pcm, num_mel_bins=80, frame_length=25, frame_shift=10, sample_frequency=rate,
                           window_type="hamming")
    features = features - features.mean(dim=0)
    with torch.no_grad():
        return backbone(features[None])[0].numpy()


@pytest.mark.parametrize("name, weights_name", [("ResNet34", "avg_model.pt"), ("ECAPA_TDNN_GLOB_c512", "avg_model"),
                                                 ("ResNet34_two_emb_layer", "avg_model.pt")])
def test_a_wespeaker_folder_embeds_files_as_wespeakers_cli_does(tmp_path, speech, name, weights_name):
    reference = REFERENCES[name]
    folder = write_wespeaker_folder(tmp_path / "model", reference["model"], reference["model_args"], classes=40,
                                    weights_name=weights_name, shapes=reference["keys"])
    model = load_model(folder)
    assert model.layout == "WeSpeaker folder" and model.prototypes.shape == (120, reference["model_args"]["embed_dim"])
    independent = wespeaker_backbone(reference["model"], reference["model_args"]).eval()
    independent.load_state_dict(seeded_state_dict(reference["keys"]))
    embedder = SpeakerEmbedder.from_pretrained(folder)
    for path in speech:
        assert _cosines(embedder.embed_file(path), _wespeaker_cli_embedding(independent, path)) >= 0.9999
    batched = embedder.embed_files(speech, progress=False)  # one batch path, trimmed to 0.1 s multiples
    assert _cosines(batched, np.stack([embedder.embed_file(path) for path in speech])).min() >= 0.9999


def test_a_wespeaker_checkpoint_wrapped_in_state_dict_loads_and_a_missing_key_is_named(tmp_path):
    reference = REFERENCES["ResNet18"]
    folder = write_wespeaker_folder(tmp_path / "model", "ResNet18", reference["model_args"], classes=4,
                                    shapes=reference["keys"])
    weights = torch.load(folder / "avg_model.pt")
    torch.save({"state_dict": weights}, folder / "avg_model.pt")
    assert load_model(folder).extractor.embedding_dim == 256
    del weights["layer1.0.conv1.weight"]
    torch.save(weights, folder / "avg_model.pt")
    with pytest.raises(ModelFolderError, match=r"avg_model.pt: .*1 missing keys \(layer1.0.conv1.weight\)"):
        load_model(folder)


def test_a_wespeaker_folder_of_another_architecture_or_front_end_is_refused_by_name(tmp_path):
    folder = write_wespeaker_folder(tmp_path / "model", "ResNet18", {"feat_dim": 80, "embed_dim": 256}, classes=4)
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("model: ResNet18", "model: CAMPPlus"))
    with pytest.raises(ModelFolderError, match="config.yaml: WeSpeaker model 'CAMPPlus' is not supported"):
        load_model(folder)
    (folder / "config.yaml").write_text(text.replace("resample_rate: 16000", "resample_rate: 16000\n  frontend: s3prl"))
    with pytest.raises(ModelFolderError, match="frontend is 's3prl'"):
        load_model(folder)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path, capsys):
    folder = write_wespeaker_folder(tmp_path / "model", "ResNet18", {"feat_dim": 80, "embed_dim": 256}, classes=4)
    torch.save({"conv1.weight": _RunsCode()}, folder / "avg_model.pt")
    with pytest.raises(Exception, match="avg_model.pt: refused: .*would call print"):
        load_model(folder)
    assert "this ran" not in capsys.readouterr().out


@pytest.fixture(scope="module", params=["ecapa", "resnet"])
def hub_folder(request, tmp_path_factory):
    return request.param, write_speechbrain_hub_folder(tmp_path_factory.mktemp(f"hub_{request.param}") / "model",
                                                       kind=request.param)


def test_a_speechbrain_hub_folder_embeds_as_speechbrain_does_without_the_hub(hub_folder, speech, tmp_path,
                                                                              monkeypatch):
    from speechbrain.inference.speaker import EncoderClassifier

    kind, folder = hub_folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any hub access fails loudly
    embedder = SpeakerEmbedder.from_pretrained(folder)
    theirs = EncoderClassifier.from_hparams(source=str(folder), savedir=str(tmp_path / "sb"),
                                            overrides={"pretrained_path": str(folder)})
    for path in speech:
        audio = torch.from_numpy(soundfile.read(path, dtype="float32")[0])[None]
        expected = theirs.encode_batch(audio).reshape(-1).numpy()
        assert _cosines(embedder.embed_file(path), expected) >= 0.9999
        assert _cosines(embedder.embed_batch(audio)[0], expected) >= 0.9999
    model = load_model(folder)
    assert model.layout == "SpeechBrain hub folder"
    assert model.prototypes.shape[0] == 7205
    if kind == "ecapa":  # its pretrainer loads the global embedding mean and the speakers
        np.testing.assert_allclose(embedder.mean, theirs.mods.mean_var_norm_emb.glob_mean.reshape(-1).numpy())
        assert model.classes[:2] == ["id00000", "id00001"] and len(model.classes) == 7205
    else:  # the published ResNet folder's pretrainer loads neither: neither is used
        assert embedder.mean is None


def test_an_unknown_folder_is_one_line_naming_what_it_holds_and_the_layouts_accepted(tmp_path, capsys):
    (tmp_path / "model.bin").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelFolderError) as error:
        load_model(tmp_path)
    message = str(error.value)
    assert "model.bin, notes.txt" in message and all(name in message for name in LAYOUTS)
    assert cli.main(["embed", "--model", str(tmp_path), "--dir", str(tmp_path), "--out", str(tmp_path / "e.npz")]) == 2
    printed = capsys.readouterr().err.strip()
    assert "\n" not in printed and "not a model folder" in printed


def test_a_public_folder_exports_to_a_folder_speechbrain_and_spkver_load_alike(tmp_path, speech):
    from speechbrain.inference.speaker import EncoderClassifier

    reference = REFERENCES["ResNet34"]
    folder = write_wespeaker_folder(tmp_path / "wespeaker", "ResNet34", reference["model_args"], classes=4,
                                    shapes=reference["keys"])
    out = tmp_path / "exported"
    assert cli.main(["export", "--model", str(folder), "--out", str(out), "--onnx"]) == 0
    original, exported = SpeakerEmbedder.from_pretrained(folder), SpeakerEmbedder.from_pretrained(out)
    theirs = EncoderClassifier.from_hparams(source=str(out), savedir=str(tmp_path / "sb"))
    for path in speech:
        audio = torch.from_numpy(soundfile.read(path, dtype="float32")[0])[None]
        expected = original.embed_batch(audio)[0]
        assert _cosines(exported.embed_batch(audio)[0], expected) >= 0.9999
        assert _cosines(theirs.encode_batch(audio).reshape(-1), expected) >= 0.9999
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "embedding_model.onnx"))
    audio = torch.from_numpy(soundfile.read(speech[0], dtype="float32")[0])[None]
    features = original.extractor.frontend(audio, torch.ones(1))
    (got,) = session.run(None, {"features": features.detach().numpy()})
    assert _cosines(got[0], original.embed_batch(audio)[0]) >= 0.9999


def test_the_compiled_backbone_embeds_as_the_eager_one_and_an_untraceable_one_runs_eagerly():
    from spkver.inference import CompiledBackboneExtractor, compiled_for_inference
    from spkver.models import wespeaker_extractor

    extractor = wespeaker_extractor("ResNet18", {"feat_dim": 80, "embed_dim": 256}).eval()
    compiled = compiled_for_inference(extractor)
    assert isinstance(compiled, CompiledBackboneExtractor)
    waveforms = 0.1 * torch.randn(2, 16000 * 3)
    with torch.no_grad():
        assert _cosines(compiled(waveforms, torch.ones(2)), extractor(waveforms, torch.ones(2))).min() >= 0.99999

    class LengthDependent(torch.nn.Module):  # a Python branch on the length: a trace would freeze it
        def forward(self, features, lengths):
            return features.mean(1) if features.shape[1] > 200 else features.std(1)

    extractor.backbone = LengthDependent()
    assert compiled_for_inference(extractor) is extractor


@pytest.fixture
def bfloat16_cpu(monkeypatch):
    """A CPU taken to multiply bfloat16 natively (torch computes it the same way, emulated, on one that does not)."""
    monkeypatch.setattr("spkver.inference.native_bfloat16", lambda: True)


@pytest.mark.parametrize("architecture", ["wespeaker ResNet18", "spkver ECAPA-TDNN"])
def test_bf16_embeds_in_bfloat16_within_cosine_1e_4_of_float32(bfloat16_cpu, architecture):
    from spkver.inference import BF16_MIN_COSINE, Bfloat16Backbone, CompiledBackboneExtractor, compiled_for_inference
    from spkver.models import ecapa_tdnn, wespeaker_extractor

    extractor = (wespeaker_extractor("ResNet18", {"feat_dim": 80, "embed_dim": 256}) if "ResNet" in architecture
                 else ecapa_tdnn(channels=256, embedding_dim=192)).eval()
    fast = compiled_for_inference(extractor, precision="bf16")
    assert isinstance(fast, CompiledBackboneExtractor) and isinstance(fast.backbone, Bfloat16Backbone)
    assert {p.dtype for p in fast.backbone.parameters()} == {torch.bfloat16}
    if "ResNet" in architecture:  # its BatchNorms are folded into the convolutions (ECAPA's follow a ReLU)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fast.backbone.modules())
    waveforms = 0.1 * torch.randn(3, 16000 * 3)
    with torch.no_grad():
        exact, got = extractor(waveforms, torch.ones(3)), fast(waveforms, torch.ones(3))
    assert got.dtype == torch.float32
    cosines = _cosines(got, exact)
    assert cosines.min() >= BF16_MIN_COSINE and cosines.min() < 1 - 1e-7  # close, and really computed in bfloat16


def test_bf16_falls_back_to_float32_with_a_log_line_when_it_would_move_the_embeddings(bfloat16_cpu, monkeypatch,
                                                                                        caplog):
    from spkver.inference import CompiledBackboneExtractor, compiled_for_inference
    from spkver.models import wespeaker_extractor

    monkeypatch.setattr("spkver.inference.BF16_MIN_COSINE", 1.0)  # no bfloat16 embedding is that close
    extractor = wespeaker_extractor("ResNet18", {"feat_dim": 80, "embed_dim": 256}).eval()
    with caplog.at_level("WARNING", logger="spkver.inference"):
        fast = compiled_for_inference(extractor, precision="bf16")
    assert isinstance(fast, CompiledBackboneExtractor) and isinstance(fast.backbone, torch.jit.ScriptModule)
    assert "bf16 embedding: cosine" in caplog.text and "embedding in fp32" in caplog.text


def test_a_precision_the_machine_cannot_run_is_refused_by_name(tmp_path, monkeypatch, capsys):
    from spkver.inference import PrecisionError

    folder = write_wespeaker_folder(tmp_path / "model", "ResNet18", {"feat_dim": 80, "embed_dim": 256}, classes=4)
    with pytest.raises(PrecisionError, match="precision 'fp16': choose one of fp32, bf16"):
        SpeakerEmbedder.from_pretrained(folder, precision="fp16")
    with pytest.raises(PrecisionError, match="on cuda embed in fp32"):
        SpeakerEmbedder.from_pretrained(folder, device="cuda", precision="bf16")
    monkeypatch.setattr("spkver.inference.native_bfloat16", lambda: False)
    assert cli.main(["verify", "--model", str(folder), "a.wav", "b.wav", "--precision", "bf16"]) == 2
    assert "no bfloat16 arithmetic (AMX or AVX512-BF16)" in capsys.readouterr().err


def test_spkver_embed_with_bf16_writes_the_float32_embeddings_to_cosine_1e_4(bfloat16_cpu, tmp_path, speech, capsys):
    from spkver.scoring import load_embeddings

    folder = write_wespeaker_folder(tmp_path / "model", "ResNet18", {"feat_dim": 80, "embed_dim": 256}, classes=4)
    listing = tmp_path / "files.txt"
    listing.write_text("".join(f"{path}\n" for path in speech))
    stores = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.npz"
        assert cli.main(["embed", "--model", str(folder), "--list", str(listing), "--out", str(out),
                         "--precision", precision]) == 0
        stores[precision] = load_embeddings(out)
    assert stores["bf16"].ids == stores["fp32"].ids
    assert _cosines(stores["bf16"].embeddings, stores["fp32"].embeddings).min() >= 0.9999
    # An interrupted bf16 run is not resumed in fp32: the store would mix two arithmetics.
    parts = tmp_path / "resumed.npz.parts"
    parts.mkdir()
    (parts / "precision").write_text("bf16")
    shutil.copy(tmp_path / "bf16.npz", parts / "part-00000.npz")
    assert cli.main(["embed", "--model", str(folder), "--list", str(listing), "--out", str(tmp_path / "resumed.npz"),
                     "--precision", "fp32"]) == 2
    assert "parts left by an interrupted run in bf16: resume it with --precision bf16" in capsys.readouterr().err
