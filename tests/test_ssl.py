"""Self-supervised front-ends: WavLM and w2v-BERT 2.0 from local Hugging Face folders, MHFA and MFA back-ends."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spkver.models.ssl import MFA, MHFA, ssl_extractor_from_folder
from tests.layouts import write_tiny_w2vbert, write_tiny_wavlm

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "voxceleb" / "train.py"


def test_mhfa_has_the_reference_parameters_and_computes_the_factorised_attentive_pooling():
    torch.manual_seed(0)
    mhfa = MHFA(head_nb=4, inputs_dim=12, compression_dim=5, outputs_dim=7, nb_layer=3)
    assert {name: tuple(p.shape) for name, p in mhfa.named_parameters()} == {
        "weights_k": (3,), "weights_v": (3,), "cmp_linear_k.weight": (5, 12), "cmp_linear_k.bias": (5,),
        "cmp_linear_v.weight": (5, 12), "cmp_linear_v.bias": (5,), "att_head.weight": (4, 5), "att_head.bias": (4,),
        "pooling_fc.weight": (7, 20), "pooling_fc.bias": (7,)}
    with torch.no_grad():
        for parameter in mhfa.parameters():
            parameter.normal_()
    x = torch.randn(2, 12, 9, 3, dtype=torch.float64)                        # (B, D, T, L)
    p = {name: value.detach().double() for name, value in mhfa.named_parameters()}
    keys = torch.einsum("bdtl,l->btd", x, torch.softmax(p["weights_k"], 0)) @ p["cmp_linear_k.weight"].T \
        + p["cmp_linear_k.bias"]
    values = torch.einsum("bdtl,l->btd", x, torch.softmax(p["weights_v"], 0)) @ p["cmp_linear_v.weight"].T \
        + p["cmp_linear_v.bias"]
    logits = torch.einsum("btc,hc->bth", keys, p["att_head.weight"]) + p["att_head.bias"]
    attention = torch.exp(logits - logits.max(1, keepdim=True).values)
    attention = attention / attention.sum(1, keepdim=True)                    # softmax over time, per head
    heads = torch.einsum("bth,btc->bhc", attention, values).reshape(2, -1)    # head-major: h * C + c
    expected = heads @ p["pooling_fc.weight"].T + p["pooling_fc.bias"]
    torch.testing.assert_close(mhfa.double()(x), expected)


def test_mfa_adapts_every_layer_and_pools_attentive_statistics():
    torch.manual_seed(1)
    mfa = MFA(inputs_dim=6, nb_layer=3, adapter_dim=4, embed_dim=5).double().eval()
    with torch.no_grad():
        mfa.pooling.attention[2].running_mean.normal_()
        mfa.pooling.attention[2].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 6, 8, 3, dtype=torch.float64)
    p = {name: value.detach() for name, value in mfa.state_dict().items()}
    adapted = []
    for layer in range(3):
        prefix = f"adapter_layers.{layer}"
        h = x[..., layer].transpose(1, 2) @ p[f"{prefix}.0.weight"].T + p[f"{prefix}.0.bias"]
        h = F.layer_norm(h, (4,), p[f"{prefix}.1.weight"], p[f"{prefix}.1.bias"])
        adapted.append(torch.relu(h) @ p[f"{prefix}.3.weight"].T + p[f"{prefix}.3.bias"])
    z = torch.cat(adapted, -1).transpose(1, 2)                                # (B, 12, T)
    a = torch.einsum("oc,bct->bot", p["pooling.attention.0.weight"][..., 0], z) + p["pooling.attention.0.bias"][:, None]
    a = (torch.relu(a) - p["pooling.attention.2.running_mean"][:, None]) / \
        torch.sqrt(p["pooling.attention.2.running_var"][:, None] + 1e-5) * p["pooling.attention.2.weight"][:, None] \
        + p["pooling.attention.2.bias"][:, None]
    a = torch.einsum("oc,bct->bot", p["pooling.attention.3.weight"][..., 0], a) + p["pooling.attention.3.bias"][:, None]
    w = torch.softmax(a, dim=2)
    mean = (z * w).sum(2)
    std = torch.sqrt(((z * z * w).sum(2) - mean ** 2).clamp_min(1e-5))
    expected = torch.cat([mean, std], 1) @ p["bottleneck.weight"].T + p["bottleneck.bias"]
    torch.testing.assert_close(mfa(x), expected)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {"wavlm": write_tiny_wavlm(root / "wavlm"), "w2v-bert": write_tiny_w2vbert(root / "w2vbert")}


@pytest.mark.parametrize("encoder", ["wavlm", "w2v-bert"])
def test_every_hidden_state_reaches_the_back_end_even_when_layer_drop_skips_layers(encoder, folders):
    import transformers

    extractor = ssl_extractor_from_folder(folders[encoder], encoder, "mhfa",
                                          {"head_nb": 2, "compression_dim": 4, "outputs_dim": 8}, layerdrop=0.9)
    waveforms = 0.1 * torch.randn(2, 16000)
    extractor.eval()
    states = extractor.frontend(waveforms)
    assert states.shape[-1] == 3 and states.shape[1] == 32                    # (B, D, T, 2 layers + 1)
    model = getattr(transformers, {"wavlm": "WavLMModel", "w2v-bert": "Wav2Vec2BertModel"}[encoder]).from_pretrained(
        str(folders[encoder]), local_files_only=True).eval()
    with torch.no_grad():
        reference = model(**extractor.frontend._inputs(waveforms), output_hidden_states=True).hidden_states
    torch.testing.assert_close(states, torch.stack(reference, -1).transpose(1, 2))
    extractor.train()
    torch.manual_seed(3)
    assert extractor.frontend(waveforms).shape == states.shape                # layers skipped: still L + 1 states


def test_lora_trains_adapters_on_w2v_berts_query_and_value_and_merges_on_export(folders):
    extractor = ssl_extractor_from_folder(folders["w2v-bert"], "w2v-bert", "mfa", {"adapter_dim": 4, "embed_dim": 8},
                                          lora={"r": 4, "lora_alpha": 8})
    trainable = {name for name, p in extractor.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("backbone.") for name in trainable)
    assert any("linear_q.lora_A" in name for name in trainable) and any("linear_v.lora_B" in name for name in trainable)
    extractor(0.1 * torch.randn(2, 16000)).sum().backward()
    assert all(p.grad is not None for name, p in extractor.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        for name, p in extractor.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)                                             # a trained adapter changes the output
    merged = extractor.merged()
    assert merged.spec["lora"] is None and not any("lora" in key for key in merged.state_dict())
    extractor.eval(), merged.eval()
    waveforms = 0.1 * torch.randn(2, 16000)
    torch.testing.assert_close(merged(waveforms), extractor(waveforms), atol=1e-5, rtol=1e-4)


def test_without_the_ssl_extra_an_ssl_model_is_one_line(tmp_path):
    script = ("import sys; sys.modules['transformers'] = None\n"
              "import spkver.models, spkver.inference\n"
              "assert 'peft' not in sys.modules\n"
              f"from spkver.models.ssl import ssl_extractor_from_folder\n"
              f"ssl_extractor_from_folder({str(tmp_path)!r}, 'wavlm')\n")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "SSL models need the ssl extra (transformers, peft, safetensors): pip install 'spkver[ssl]'" in done.stderr
    clean = subprocess.run([sys.executable, "-c", "import spkver.models, spkver.inference, spkver.cli, sys; "
                            "print(any(m in sys.modules for m in ('transformers', 'peft', 'safetensors')))"],
                           capture_output=True, text=True)
    assert clean.stdout.strip() == "False", clean.stderr


@pytest.mark.parametrize("experiment, encoder, overrides", [
    ("wavlm_base_plus_mhfa_qmargin.yaml", "wavlm", ["--mhfa_heads=4"]),
    ("w2vbert_mfa_lora_qmargin.yaml", "w2v-bert", ["--ssl_lora={r: 4, lora_alpha: 8}"]),
])
def test_each_ssl_recipe_trains_evaluates_exports_and_its_export_reloads(experiment, encoder, overrides, folders,
                                                                        tiny_corpus, tmp_path, monkeypatch, capsys):
    from spkver import cli
    from spkver.inference import SpeakerEmbedder

    output = tmp_path / "exp"
    arguments = [str(ROOT / "hparams" / "ssl" / experiment), f"--ssl_folder={folders[encoder]}",
                 f"--data_folder={tiny_corpus}", f"--trial_lists=[{tiny_corpus}/trials.txt]",
                 f"--output_folder={output}", "--number_of_epochs=2", "--batch_size=8", "--num_workers=0",
                 "--lr_warmup_epochs=1", "--margin_warmup_start=0", "--margin_warmup_epochs=1", "--crop_seconds=1.0",
                 "--mean_utterances=10", "--average_last=2", "--calibration_min_nontargets=10", *overrides]
    monkeypatch.setattr(sys, "argv", [str(RECIPE), *arguments])
    runpy.run_path(str(RECIPE), run_name="__main__")
    results = json.loads((output / "results.json").read_text())
    assert results["stages"]["cosine"]["after_training"][0]["trials"] > 0
    exported = tmp_path / "exported"
    assert cli.main(["export", "--model", str(output), "--out", str(exported)]) == 0
    card = json.loads((exported / "spkver.json").read_text())
    assert card["extractor"]["architecture"] == "ssl" and card["extractor"]["lora"] is None  # LoRA merged
    assert card["extractor"]["config"]["hidden_size"] == 32                  # self-contained: the encoder's config
    wav = sorted((tiny_corpus / "wav").rglob("*.wav"))[0]
    trained, reloaded = SpeakerEmbedder.from_pretrained(output), SpeakerEmbedder.from_pretrained(exported)
    np.testing.assert_allclose(trained.embed_file(wav), reloaded.embed_file(wav), rtol=1e-4, atol=1e-5)
    assert cli.main(["embed", "--model", str(exported), "--dir", str(tiny_corpus / "wav"),
                     "--out", str(tmp_path / "emb.npz")]) == 0
    assert cli.main(["verify", "--model", str(exported), str(wav), str(wav)]) == 0
    assert cli.main(["verify", "--model", str(exported), str(wav), str(wav), "--precision", "bf16"]) == 2
    assert "precision 'bf16' is for filterbank extractors" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", str(exported), "--manifests", str(output / "manifests"),
                     "--trials", f"{tiny_corpus}/trials.txt", "--stages", "cosine"]) == 0
    assert (exported / "results.json").exists()
    if encoder == "wavlm":  # the second stage starts from the exported folder: its extractor, class-mean prototypes
        second = tmp_path / "fixed_margin"
        monkeypatch.setattr(sys, "argv", [
            str(RECIPE), str(ROOT / "hparams" / "ssl" / "wavlm_fixed_margin.yaml"), f"--init_from={exported}",
            f"--ssl_folder={folders[encoder]}", f"--data_folder={tiny_corpus}",
            f"--trial_lists=[{tiny_corpus}/trials.txt]", f"--output_folder={second}", "--number_of_epochs=1",
            "--batch_size=8", "--num_workers=0", "--crop_seconds=1.0", "--mean_utterances=10", "--average_last=1",
            "--calibration_min_nontargets=10", *overrides])
        runpy.run_path(str(RECIPE), run_name="__main__")
        log = (second / "log.txt").read_text()
        assert f"fine-tuning from {exported} (spkver export): extractor; prototypes start at the normalised " \
            "class-mean embeddings" in log
    code = cli.main(["export", "--model", str(output), "--out", str(tmp_path / "onnx"), "--onnx"])
    if encoder == "w2v-bert":  # its feature extractor runs in NumPy: a trace would freeze it
        assert code == 2 and "ONNX export of w2v-BERT: its feature extractor" in capsys.readouterr().err
        assert (tmp_path / "onnx" / "spkver.json").exists()
        return
    import onnxruntime

    assert code == 0
    audio = 0.1 * torch.randn(1, 20000)
    (got,) = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "embedding_model.onnx")).run(
        None, {"waveforms": audio.numpy()})
    np.testing.assert_allclose(got[0], reloaded.embed_batch(audio)[0].numpy(), rtol=1e-3, atol=1e-4)
