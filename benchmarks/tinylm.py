"""A small byte-level causal language model trained on Python's own standard library source.

The quality benchmark (``benchmarks/quality.py``) needs a language model whose perplexity moves
when its weights are pruned, trained here in minutes on CPU and on text every machine has: the
top-level ``*.py`` files of the running interpreter's standard library (``sysconfig``'s
``stdlib`` path). Nothing is downloaded.

- Corpus: files sorted by name; a file goes to validation when ``crc32(name) % 10 == 0``
  (deterministic, and whole files, so no function is split across train and validation).
  Tokens are bytes (vocabulary 256).
- Model: pre-LayerNorm transformer; every matmul is a plain ``nn.Linear`` (``attn.q/k/v/o``,
  ``mlp.fc1/fc2``) so that the pruners see Linear layers; the blocks live in ``model.blocks``
  (an ``nn.ModuleList``), so ``sequential="blocks.*"`` names them. ``forward(ids [B, T]) ->
  logits [B, T, 256]``; a block's forward takes and returns one tensor ``[B, T, d_model]``.
- Cache: trained dense weights are saved under a directory keyed by the configuration, the seed
  and a digest of the corpus, so reruns skip training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides the trained weights (with the seed and the corpus)."""

    n_blocks: int = 4
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: int = 4
    context: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    #: bytes of training text used at most (the first files in sorted order), to bound I/O
    max_train_bytes: int = 4_000_000
    max_val_bytes: int = 400_000

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


# -- corpus ----------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library path {root}")
    return files


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # uint8 -> long on use; 1-D
    val: torch.Tensor
    digest: str

    @classmethod
    def load(cls, max_train_bytes: int, max_val_bytes: int) -> Corpus:
        train, val = bytearray(), bytearray()
        for path in stdlib_files():
            is_val = zlib.crc32(path.name.encode()) % 10 == 0
            buf, cap = (val, max_val_bytes) if is_val else (train, max_train_bytes)
            if len(buf) < cap:
                buf += path.read_bytes()[: cap - len(buf)]
        if not train or not val:
            raise ValueError(f"the standard library split left train={len(train)} and val={len(val)} bytes")
        digest = hashlib.sha256(bytes(train) + b"\0" + bytes(val)).hexdigest()[:12]
        # bytearrays are writable, so frombuffer shares them without a warning; clone to own the memory
        return cls(torch.frombuffer(train, dtype=torch.uint8).clone(), torch.frombuffer(val, dtype=torch.uint8).clone(), digest)


def random_windows(data: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` windows of ``length + 1`` bytes at random offsets, as a long tensor [n, length + 1]."""
    starts = torch.randint(0, data.numel() - length - 1, (n,), generator=generator)
    return torch.stack([data[s : s + length + 1] for s in starts.tolist()]).long()


def consecutive_windows(data: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """Up to ``n`` non-overlapping windows of ``length + 1`` bytes from the start (held-out eval)."""
    n = min(n, (data.numel() - 1) // length)
    return torch.stack([data[i * length : i * length + length + 1] for i in range(n)]).long()


# -- model -----------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        heads = lambda y: y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError(f"d_model={config.d_model} is not a multiple of n_heads={config.n_heads}")
        self.embed = nn.Embedding(VOCAB, config.d_model)
        self.pos = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(
            Block(config.d_model, config.n_heads, config.mlp_ratio * config.d_model) for _ in range(config.n_blocks)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


#: Coverage for the pruners: the Linear weights inside the blocks (not embeddings, norms, biases
#: or the head), as the papers prune them.
BLOCK_LINEARS = {"include": ["blocks.*.weight"], "exclude": ["blocks.*.ln*"]}


# -- training and evaluation -----------------------------------------------------------------
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-byte cross-entropy (nats) over ``windows`` [n, T + 1]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch_size):
            w = windows[i : i + batch_size]
            logits = model(w[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1), reduction="sum").item()
            count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    return math.exp(mean_loss(model, windows))


def train(config: Config, corpus: Corpus, seed: int, log: bool = False) -> TinyLM:
    """A freshly initialised model trained with AdamW (warm-up then cosine decay); deterministic
    for a given seed and thread count."""
    torch.manual_seed(seed)
    model = TinyLM(config)
    generator = torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)),
    )
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        w = random_windows(corpus.train, config.batch_size, config.context, generator)
        loss = F.cross_entropy(model(w[:, :-1]).reshape(-1, VOCAB), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 100 == 0 or step == config.steps - 1):
            print(f"  seed {seed} step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return model


def trained(config: Config, corpus: Corpus, seed: int, cache_dir: Path | None, log: bool = False) -> tuple[TinyLM, dict]:
    """The dense model for ``seed``: from ``cache_dir`` when trained before with the same config
    and corpus, else trained now (and cached). Returns the model and how it was obtained
    (``cached``, and the wall and CPU seconds its training took)."""
    path = cache_dir / f"tinylm-{config.key()}-{corpus.digest}-seed{seed}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        model = TinyLM(config)
        model.load_state_dict(torch.load(path, weights_only=True))
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return model.eval(), {**meta, "cached": True}
    wall, cpu = time.perf_counter(), time.process_time()
    model = train(config, corpus, seed, log=log)
    meta = {"train_wall_s": round(time.perf_counter() - wall, 1), "train_cpu_s": round(time.process_time() - cpu, 1)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)  # atomic: a killed run leaves no half-written cache entry
        path.with_suffix(".json").write_text(json.dumps({**meta, "config": dataclasses.asdict(config), "seed": seed}))
    return model, {**meta, "cached": False}
