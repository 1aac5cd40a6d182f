"""``sparsity inspect`` on each supported format, through the CLI in a subprocess.

Each run imports torch in a fresh interpreter (seconds on a loaded machine): marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sparsity_core import save_sparse


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "sparsity_core.cli", "inspect", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def state() -> dict[str, torch.Tensor]:
    """Known zeros: fc1 2:4 along its inputs (last dim), fc2 2:4 along dim 0 only, a conv at 50%."""
    gen = torch.Generator().manual_seed(0)
    fc1 = torch.randn(16, 32, generator=gen)
    fc1.view(16, 8, 4)[:, :, :2] = 0  # 50%, 2:4 along the last dim
    fc2 = torch.randn(32, 16, generator=gen)
    fc2.view(8, 4, 16)[:, :2, :] = 0  # 50%, 2:4 along dim 0 only
    conv = torch.randn(4, 2, 3, 3, generator=gen)
    conv.view(-1)[::2] = 0  # 36 of 72
    return {"fc1.weight": fc1, "fc1.bias": torch.ones(16), "fc2.weight": fc2, "conv.weight": conv,
            "big.weight": torch.randn(64, 64, generator=gen) * (torch.rand(64, 64, generator=gen) >= 0.9)}


def check_json(info: dict, fmt: str) -> None:
    assert fmt in info["format"]
    rows = {t["name"]: t for t in info["tensors"]}
    assert set(rows) == set(state())
    assert rows["fc1.weight"]["zeros"] == 256 and rows["fc1.weight"]["sparsity"] == 0.5
    assert rows["fc1.weight"]["two_four"] is True and "1:4" not in rows["fc1.weight"]["nm"]
    # 2:4 along dim 0 only: a transformers Conv1D's input axis, reported as such
    assert rows["fc2.weight"]["two_four"] is True and "2:4 (dim 0)" in rows["fc2.weight"]["nm"]
    assert rows["conv.weight"]["nm"] is None and rows["conv.weight"]["zeros"] == 36  # rank 4: no verdict
    assert rows["fc1.bias"]["zeros"] == 0 and rows["fc1.bias"]["nm"] is None
    assert info["two_four"] == ["fc1.weight", "fc2.weight"] and "last dim" in info["nm_axis"]
    expected = sum(int((t == 0).sum()) for t in state().values()) / sum(t.numel() for t in state().values())
    assert info["overall"] == pytest.approx(expected)


@pytest.mark.slow
def test_torch_state_dict(tmp_path):
    torch.save(state(), tmp_path / "model.pt")
    check_json(json.loads(run(str(tmp_path / "model.pt"), "--json").stdout), "torch state dict")


@pytest.mark.slow
def test_lightning_checkpoint(tmp_path):
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            for name, t in state().items():
                module, attr = name.split(".")
                if not hasattr(self, module):
                    self.add_module(module, nn.Module())
                getattr(self, module).register_parameter(attr, nn.Parameter(t.clone()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.strategy.connect(Tiny())
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")
    assert "state_dict" in torch.load(tmp_path / "tiny.ckpt", weights_only=True)
    check_json(json.loads(run(str(tmp_path / "tiny.ckpt"), "--json").stdout), "Lightning checkpoint")


@pytest.mark.slow
def test_plain_safetensors(tmp_path):
    save_file(state(), tmp_path / "model.safetensors")
    check_json(json.loads(run(str(tmp_path / "model.safetensors"), "--json").stdout), "safetensors")


@pytest.mark.slow
def test_compressed_file_table_and_plot(tmp_path):
    saved = save_sparse(state(), tmp_path / "model.sparse.safetensors")
    assert saved.storage["big.weight"] == "sparse-bitmask"
    info = json.loads(run(str(tmp_path / "model.sparse.safetensors"), "--json").stdout)
    check_json(info, "sparsity-core compressed")
    assert {t["name"]: t["storage"] for t in info["tensors"]} == saved.storage

    png = tmp_path / "sparsity.png"
    out = run(str(tmp_path / "model.sparse.safetensors"), "--plot", str(png)).stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote a bar chart of 4 tensors to {png}" in out  # the 4 tensors of rank >= 2
    for text in ("fc1.weight", "50.00%", "2:4", "sparse-bitmask", "overall", "last dim", "[out, in]"):
        assert text in out, text


@pytest.mark.slow
@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint at all", "neither safetensors nor a torch file"),
    (None, "neither safetensors nor a torch file"),  # a pickled module: refused by weights_only
])
def test_unreadable_files_exit_2_with_the_reason(tmp_path, content, message):
    path = tmp_path / "thing.pt"
    if content is None:
        torch.save(nn.Linear(2, 2), path)
    else:
        path.write_bytes(content)
    proc = run(str(path), ok=False)
    assert proc.returncode == 2 and message in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_malformed_compressed_file_exits_2_naming_the_tensor(tmp_path):
    path = tmp_path / "m.safetensors"
    save_sparse(state(), path)
    from safetensors import safe_open
    from safetensors.torch import load_file

    raw = load_file(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    raw["big.compressed"] = raw["big.compressed"][:-1].clone()
    save_file(raw, path, metadata=meta)
    proc = run(str(path), ok=False)
    assert proc.returncode == 2 and "'big.weight'" in proc.stderr and "set bits" in proc.stderr


@pytest.mark.slow
def test_missing_file(tmp_path):
    proc = run(str(tmp_path / "nope.ckpt"), ok=False)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_help_lists_inspect():
    out = subprocess.run([sys.executable, "-m", "sparsity_core.cli", "--help"], capture_output=True, text=True).stdout
    assert "inspect" in out


def test_inspect_in_process_for_the_quick_loop(tmp_path, capsys):
    """The same command without a subprocess (not slow): every format through ``main``."""
    from sparsity_core.cli import main

    torch.save(state(), tmp_path / "a.pt")
    torch.save({"state_dict": state(), "epoch": 3}, tmp_path / "b.ckpt")
    save_file(state(), tmp_path / "c.safetensors")
    save_sparse(state(), tmp_path / "d.safetensors")
    formats = []
    for name in ("a.pt", "b.ckpt", "c.safetensors", "d.safetensors"):
        assert main(["inspect", str(tmp_path / name), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        check_json(info, "")
        formats.append(info["format"])
    assert formats == ["torch state dict", "Lightning checkpoint (state_dict)", "safetensors",
                       "sparsity-core compressed safetensors (sparse-bitmask)"]


def test_nm_patterns_along_the_last_dim():
    from sparsity_core.deploy._inspect import nm_patterns

    one_in_four = torch.zeros(2, 8)
    one_in_four[:, ::4] = 1.0
    assert nm_patterns(one_in_four) == ("1:2", "1:4", "2:4", "2:8", "4:8")
    assert nm_patterns(torch.ones(2, 8)) == ()
    assert nm_patterns(torch.ones(2, 6)[:, :6] * torch.tensor([1.0, 0, 1, 0, 1, 0])) == ("1:2",)  # 6 % 4 != 0
    assert nm_patterns(torch.ones(8)) is None and nm_patterns(torch.ones(2, 2, 4)) is None


def test_n_m_along_dim_0_is_found_for_conv1d_layouts():
    import torch

    from sparsity_core.deploy._inspect import nm_patterns

    w = torch.randn(8, 6)  # [in, out] as transformers' Conv1D stores it
    keep = torch.zeros(8, 6, dtype=torch.bool)
    keep[0::4] = True
    keep[1::4] = True  # 2 of every 4 consecutive inputs, for every output
    assert nm_patterns(w * keep) == ("2:4 (dim 0)", "4:8 (dim 0)")
    assert nm_patterns((w * keep).t().contiguous())[:1] == ("2:4",)
