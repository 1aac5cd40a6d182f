"""Hugging Face models end to end, built from tiny configs (random init, nothing downloaded):
default coverage per family (exact name sets), 2:4 along the input axis of every matmul, the
semi-structured round trip, wanda with token-id and dict calibration batches, and Lightning fits
of a tiny GPT-2 (the tie between ``wte`` and ``lm_head`` survives fit and resume).

Importing transformers' models costs several seconds per process: the module is marked slow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from torch.sparse._semi_structured_conversions import (  # noqa: E402
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)
from torch.utils.data import DataLoader  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import sparsity_core as sc  # noqa: E402
from sparsity_core._targets import select_tensors  # noqa: E402
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity  # noqa: E402

pytestmark = pytest.mark.slow

VOCAB, LAYERS = 128, 2


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=LAYERS, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # a resumed fit replays the same steps (no RNG in the loss)
    )
    return transformers.GPT2LMHeadModel(config)


def llama(tied: bool) -> nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(
        num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return transformers.BertForMaskedLM(config)


def t5() -> nn.Module:
    config = transformers.T5Config(
        num_layers=LAYERS, num_decoder_layers=LAYERS, d_model=32, d_ff=64, d_kv=8, num_heads=4, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config)


def names(template: str, parts: tuple[str, ...]) -> set[str]:
    return {template.format(i=i, part=p) for i in range(LAYERS) for p in parts}


QKVO = ("q", "k", "v", "o")
# The matmul weights inside the blocks, written out from each architecture (not from our code).
BLOCKS: dict[str, set[str]] = {
    "gpt2": names("transformer.h.{i}.{part}.weight", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
    "llama": names(
        "model.layers.{i}.{part}.weight",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    "bert": names(
        "bert.encoder.layer.{i}.{part}.weight",
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"),
    ),
    "t5": names("encoder.block.{i}.layer.0.SelfAttention.{part}.weight", QKVO)
    | names("encoder.block.{i}.layer.1.DenseReluDense.{part}.weight", ("wi", "wo"))
    | names("decoder.block.{i}.layer.0.SelfAttention.{part}.weight", QKVO)
    | names("decoder.block.{i}.layer.1.EncDecAttention.{part}.weight", QKVO)
    | names("decoder.block.{i}.layer.2.DenseReluDense.{part}.weight", ("wi", "wo")),
}
FAMILIES = {
    "gpt2": gpt2,
    "llama_tied": lambda: llama(True),
    "llama_untied": lambda: llama(False),
    "bert": bert,
    "t5": t5,
}


def family(key: str) -> str:
    return key.split("_")[0]


def covered(model: nn.Module, args: dict | None = None, sparsifier: str = "magnitude") -> set[str]:
    return set(select_tensors(model, sc.create_sparsifier(sparsifier, args)).tensors)


def ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def matmul_view(model: nn.Module, name: str) -> torch.Tensor:
    """A covered weight as its matmul sees it, [outputs, inputs] (transformers' Conv1D stores [in, out])."""
    prefix, _, attr = name.rpartition(".")
    module = model.get_submodule(prefix)
    w = getattr(module, attr).detach()
    return w.t() if isinstance(module, Conv1D) else w


# -- coverage ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", list(FAMILIES))
def test_default_coverage_is_the_block_matmul_weights(key):
    torch.manual_seed(0)
    model = FAMILIES[key]()
    expected = set(BLOCKS[family(key)])
    if key == "bert":
        # BertForMaskedLM's head has a Linear of its own (transform.dense) besides the decoder tied
        # to the word embeddings: a matmul, so covered; the blocks alone are the one-liner below
        expected.add("cls.predictions.transform.dense.weight")
    assert covered(model) == expected
    # never an embedding, a norm, a bias, T5's relative-position tables or an LM head
    assert not any(n.endswith("bias") or "norm" in n.lower() or "embed" in n or "relative" in n or "lm_head" in n for n in covered(model))


def test_one_liners_per_family():
    assert covered(bert(), {"include": ["linear:bert.encoder.*"]}) == BLOCKS["bert"]
    assert covered(gpt2(), {"include": ["conv1d:*"]}) == BLOCKS["gpt2"]
    untied = llama(False)
    assert covered(untied, {"include": ["linear:*"]}) == BLOCKS["llama"] | {"lm_head.weight"}  # the head too, by kind
    assert covered(untied, {"exclude": ["*.mlp.*"]}) == {n for n in BLOCKS["llama"] if ".mlp." not in n}


def test_gpt2s_tied_head_is_one_tensor_under_both_names():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    selection = select_tensors(model, sc.create_sparsifier("magnitude", {"include": ["lm_head.weight"]}))
    assert list(selection.tensors) == ["transformer.wte.weight"]
    assert selection.aliases["transformer.wte.weight"] == ("transformer.wte.weight", "lm_head.weight")
    assert selection.layouts["transformer.wte.weight"].kind == "linear"  # oriented as the head's matmul
    report = sc.sparsify(model, "random", {"sparsity_level": 0.5, "include": ["lm_head.weight", "transformer.wte.weight"]})
    assert len(report) == 1 and report["lm_head.weight"] == 0.5
    assert (model.lm_head.weight == 0).float().mean().item() == 0.5  # pruned once, not twice


# -- 2:4 along the input axis ------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["gpt2", "llama_untied", "bert", "t5"])
def test_2_4_groups_run_along_the_input_axis_and_pass_the_semi_structured_round_trip(key):
    torch.manual_seed(1)
    model = FAMILIES[key]()
    report = sc.sparsify(model, "magnitude", {"pattern": "2:4"})
    assert set(report) == covered(FAMILIES[key]()) and report.overall == 0.5
    packed_ok = 0
    for name in report:
        w = matmul_view(model, name)
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all(), name
        for dtype in (torch.float16, torch.bfloat16):
            dense = w.to(dtype).contiguous()
            if dense.shape[0] % 32 or dense.shape[1] % 16:  # what the CUTLASS packing takes
                continue
            packed, meta = sparse_semi_structured_from_dense_cutlass(dense)
            assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), dense), name
            packed_ok += 1
    assert packed_ok >= len(report)  # every matrix of these configs is packable in at least one dtype


# -- wanda -------------------------------------------------------------------------------------------
def calibration(key: str) -> list[Any]:
    batches = [ids(seed=s) for s in range(3)]
    if family(key) == "t5":  # an encoder-decoder: dict batches, as a collator yields them
        return [{"input_ids": b, "decoder_input_ids": b[:, :8]} for b in batches]
    if key == "bert":
        return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches]
    return batches  # token-id tensors: model(input_ids)


@pytest.mark.parametrize("key", list(FAMILIES))
def test_wanda_with_the_defaults_prunes_every_output_row_of_the_blocks(key):
    torch.manual_seed(2)
    model = FAMILIES[key]()
    embeddings = {n: p.detach().clone() for n, p in model.named_parameters() if "embed" in n or "wte" in n or "shared" in n}
    report = sc.sparsify(model, "wanda", {"sparsity_level": 0.5}, calibration=calibration(key))
    assert set(report) == covered(FAMILIES[key](), sparsifier="wanda")
    for name in report:
        w = matmul_view(model, name)
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name  # each output row at the level
    for name, before in embeddings.items():
        assert torch.equal(dict(model.named_parameters(remove_duplicate=False))[name], before), name


def test_wanda_on_a_square_conv1d_gives_the_masks_of_the_equivalent_linear():
    torch.manual_seed(3)
    conv, linear = Conv1D(16, 16), nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        conv.weight.normal_()
        linear.weight.copy_(conv.weight.t())
    batches = [torch.randn(4, 5, 16) * torch.linspace(0.1, 3.0, 16) for _ in range(2)]
    for args in ({"sparsity_level": 0.5}, {"sparsity_level": 0.5, "per_output": False}, {"pattern": "2:4"}):
        c, lin = nn.Sequential(Conv1D(16, 16)), nn.Sequential(nn.Linear(16, 16, bias=False))
        with torch.no_grad():
            c[0].weight.copy_(conv.weight)
            lin[0].weight.copy_(linear.weight)
        sc.sparsify(c, "wanda", args, calibration=batches)
        sc.sparsify(lin, "wanda", args, calibration=batches)
        assert torch.equal(c[0].weight.t() == 0, lin[0].weight == 0), args


def test_wanda_sequential_on_gpt2_blocks():
    torch.manual_seed(4)
    model = gpt2()
    report = sc.sparsify(model, "wanda", {"sparsity_level": 0.5}, calibration=calibration("gpt2"), sequential="transformer.h.*")
    assert set(report) == BLOCKS["gpt2"] and report.overall == 0.5


# -- Lightning ---------------------------------------------------------------------------------------
class TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = gpt2()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def token_data() -> DataLoader:
    return DataLoader(ids(batch=16, length=16, seed=5), batch_size=4)


def fit(tmp: Path, ckpt_path: Path | None = None) -> tuple[TinyLM, TrainingAwareSparsity]:
    pl.seed_everything(0, verbose=False)
    model = TinyLM()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.6}, "cubic", {"start": 0, "end": 2}, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=3, enable_progress_bar=False, enable_model_summary=False,
        logger=False, num_sanity_val_steps=0, deterministic=True, callbacks=[cb, ckpt],
    )
    trainer.fit(model, token_data(), ckpt_path=ckpt_path)
    return model, cb


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_training_aware_fit_of_gpt2_reaches_the_level_in_the_blocks_and_keeps_the_tie(tmp_path):
    whole, cb = fit(tmp_path)
    gpt = whole.model
    assert gpt.lm_head.weight is gpt.transformer.wte.weight  # the tie survives the fit
    assert cb.controller is not None and set(cb.controller.tensors) == BLOCKS["gpt2"]
    for name in BLOCKS["gpt2"]:
        assert (gpt.get_parameter(name) == 0).float().mean().item() == pytest.approx(0.6, abs=1e-3), name
    assert (gpt.transformer.wte.weight != 0).all()  # the embedding (and head) stay dense

    resumed, rcb = fit(tmp_path, ckpt_path=tmp_path / "epoch=1.ckpt")
    rgpt = resumed.model
    assert rgpt.lm_head.weight is rgpt.transformer.wte.weight  # and the resume
    for (name, p), (_, q) in zip(gpt.state_dict().items(), rgpt.state_dict().items()):
        assert torch.equal(p, q), name
    assert rcb.controller is not None and all(torch.equal(rcb.controller.masks[n], m) for n, m in cb.controller.masks.items())


def test_post_training_wanda_on_gpt2_from_a_fit():
    pl.seed_everything(0, verbose=False)
    model = TinyLM()
    cb = PostTrainingSparsity("wanda", {"sparsity_level": 0.5}, calibration_batches=2, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
        logger=False, enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[cb],
    )
    trainer.fit(model, token_data())
    assert cb.report is not None and set(cb.report) == BLOCKS["gpt2"] and cb.report.overall == 0.5
    assert cb.sparsified.lm_head.weight is cb.sparsified.transformer.wte.weight  # a deep copy keeps the tie
