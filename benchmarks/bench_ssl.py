"""Cost of the SSL front-ends at their real sizes: forward and forward+backward time and peak memory.

WavLM Base+ (hidden 768, 12 layers: transformers' WavLMConfig defaults, the size of
microsoft/wavlm-base-plus) with MHFA (64 heads) and w2v-BERT 2.0 (hidden 1024, 24 conformer layers:
Wav2Vec2BertConfig's defaults, the size of facebook/w2v-bert-2.0) with MFA, random weights (the cost
does not depend on them), each with the encoder frozen, fine-tuned (WavLM's convolutional feature
encoder stays frozen, as in the recipe) and with LoRA (r = 64, alpha = 128), against spkver's
ECAPA-TDNN C = 1024 in the same run. One batch of 3 s crops; the backward pass is of the sum of the
embeddings. Each model runs in a fresh process, whose peak resident memory is reported (weights,
activations, gradients and workspace; on a GPU, CUDA's allocator peak): a process that had freed
an earlier model would reuse its memory and hide the next one's.

    python benchmarks/bench_ssl.py                              # CPU: batch 4
    python benchmarks/bench_ssl.py --device cuda --batch 32     # the same measurement on a GPU
"""
import argparse
import json
import sys

import torch
from measure import Results, median_seconds, run_measured

from spkver.models import ecapa_tdnn
from spkver.models.ssl import ssl_extractor

MODES = {"frozen encoder": {"freeze_encoder": True}, "fine-tuned encoder": {},
         "LoRA": {"lora": {"r": 64, "lora_alpha": 128}}}


def _build(encoder: str, mode: str):
    import transformers

    if encoder == "wavlm":
        config, backend, arguments = transformers.WavLMConfig().to_dict(), "mhfa", {"head_nb": 64}
        preprocessor = {"do_normalize": True}
    else:
        config, backend, arguments = transformers.Wav2Vec2BertConfig().to_dict(), "mfa", {}
        preprocessor = transformers.SeamlessM4TFeatureExtractor().to_dict()
    options = {key: value for key, value in MODES[mode].items() if key != "lora"}
    return ssl_extractor(encoder, config, backend, arguments, preprocessor, options, lora=MODES[mode].get("lora"))


def _measure(model, waveforms, device: str, repeats: int):
    model = model.to(device)

    def forward():
        model.eval()
        with torch.no_grad():
            model(waveforms, torch.ones(waveforms.shape[0], device=device))

    def forward_backward():
        model.train()
        model.zero_grad(set_to_none=True)
        model(waveforms, torch.ones(waveforms.shape[0], device=device)).sum().backward()

    forward_seconds = median_seconds(forward, repeats, device, warmup=1)
    training_seconds = median_seconds(forward_backward, repeats, device, warmup=1)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    gpu_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return {"forward": forward_seconds, "training": training_seconds, "trainable": trainable, "total": total,
            "gpu_peak": gpu_peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("ENCODER", "MODE"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        encoder, mode = args.one
        waveforms = 0.1 * torch.randn(args.batch, 3 * 16000, device=args.device)
        model = ecapa_tdnn(channels=1024, embedding_dim=192) if encoder == "ecapa" else _build(encoder, mode)
        print("@json " + json.dumps(_measure(model, waveforms, args.device, args.repeats)))
        return
    runs = [("ECAPA-TDNN C=1024 (spkver)", "ecapa", "trained whole")]
    runs += [(name, encoder, mode) for encoder, name in (("wavlm", "WavLM Base+ + MHFA"),
                                                        ("w2v-bert", "w2v-BERT 2.0 + MFA")) for mode in MODES]
    rows = []
    for name, encoder, mode in runs:
        _, peak_mib, output = run_measured([sys.executable, __file__, "--one", encoder, mode, "--device", args.device,
                                            "--batch", str(args.batch), "--repeats", str(args.repeats)])
        figures = json.loads(next(line for line in output.splitlines() if line.startswith("@json "))[6:])
        peak = figures["gpu_peak"] / 2 ** 30 if figures["gpu_peak"] is not None else peak_mib / 1024
        rows.append([name, mode, f"{figures['total'] / 1e6:.1f} M", f"{figures['trainable'] / 1e6:.2f} M",
                     f"{figures['forward']:.2f}", f"{figures['training']:.2f}", f"{peak:.2f}"])
        print(rows[-1], flush=True)
    reference = float(rows[0][5])
    for row in rows:
        row.insert(6, f"{float(row[5]) / reference:.1f}")
    results = Results("bench_ssl", args.device)
    memory = "GPU allocator peak GiB" if args.device.startswith("cuda") else "process peak memory GiB"
    results.table("cost", f"One batch of {args.batch} crops of 3 s, random weights at the real sizes",
                  ["model", "encoder", "parameters", "trained", "forward s", "forward+backward s",
                   "forward+backward vs ECAPA", memory], rows,
                  align=["---", "---", "---:", "---:", "---:", "---:", "---:", "---:"])
    results.save()


if __name__ == "__main__":
    main()
