"""Default coverage of real-size configs, built on the meta device (no memory, no download):
the figures of docs/models.md. Needs transformers (the test extra).

    python benchmarks/default_coverage.py
"""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import transformers  # noqa: E402

import sparsity_core as sc  # noqa: E402
from sparsity_core._targets import select_tensors  # noqa: E402
from test_layer_kinds import Bottleneck  # noqa: E402  (torchvision's ResNet bottleneck, by hand)

class ResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False); self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (n, w) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)]):
            blocks = []
            for j in range(n):
                b = Bottleneck(cin, w, 4 * w, 2 if j == 0 and i > 0 else 1)
                if j: b.downsample = nn.Identity()
                blocks.append(b); cin = 4 * w
            setattr(self, f"layer{i+1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(2048, 1000)

class ViTB16(nn.Module):
    def __init__(self, dim=768, layers=12):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, 16, 16)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 197, dim))
        layer = nn.TransformerEncoderLayer(dim, 12, 3072, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(dim); self.heads = nn.Linear(dim, 1000)

models = {
  "GPT-2 (124M)": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config()),
  "Llama (1B-class, tied)": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)),
  "Llama (untied)": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)),
  "BERT-base (MLM)": lambda: transformers.BertForMaskedLM(transformers.BertConfig()),
  "T5-small": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config()),
  "ViT-B/16 (torch.nn)": ViTB16,
  "ResNet-50 (torch.nn)": ResNet50,
}
for label, make in models.items():
    with torch.device("meta"):
        m = make()
    total = sum(p.numel() for p in m.parameters())
    sel = select_tensors(m, sc.create_sparsifier("magnitude"))
    cov = sum(t.numel() for t in sel.tensors.values())
    kinds = sorted({l.kind for l in sel.layouts.values()})
    print(f"{label}: {len(sel.tensors)} tensors, {cov/1e6:.1f}M of {total/1e6:.1f}M params ({cov/total:.1%}), kinds {kinds}")
