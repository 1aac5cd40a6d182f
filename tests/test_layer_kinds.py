"""Layer kinds: default coverage per model family, orientation of N:M and blocks per kind, the CPU
semi-structured round trip, tied weights, per-tensor bounds in global scope, layer-kind selectors,
and a third-party layer kind registered by an installed plugin through ``register_layer_kinds``.

No torchvision: a ResNet-like block and a ViT-like encoder are built by hand from torch.nn.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

import sparsity_core as sc
from sparsity_core import PluginWarning, SparsityController
from sparsity_core._layers import BUILTIN_LAYER_KINDS, kind_of, layer_kinds, layout_of
from sparsity_core._targets import select_tensors


# -- hand-built model families ---------------------------------------------------------------------
class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1, 3x3, 1x1 convs with batch norms, a strided downsample."""

    def __init__(self, cin: int, width: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.downsample(x))


class ResNetLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 8, 32))
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class ViTLike(nn.Module):
    """torchvision's ViT layout: conv patch embedding, class token, position table, an encoder of
    nn.TransformerEncoderLayer (nn.MultiheadAttention inside), a Linear head."""

    def __init__(self, dim: int = 32, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, 4, stride=4)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
        return self.head(self.ln(self.encoder(x))[:, 0])


class TiedLM(nn.Module):
    """A language model whose output head shares the token embedding (GPT-2, Llama-tied, T5)."""

    def __init__(self, vocab: int = 64, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(8, dim)
        self.block = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[-1]))
        return self.head(self.norm(x + self.block(x)))


def covered(model: nn.Module, args: dict | None = None, sparsifier: str = "magnitude") -> list[str]:
    return list(select_tensors(model, sc.create_sparsifier(sparsifier, args)).tensors)


# -- the built-in kinds --------------------------------------------------------------------------
def test_builtin_kinds_are_registered_through_the_hook_and_match_their_modules():
    assert [k.name for k in layer_kinds()[: len(BUILTIN_LAYER_KINDS)]] == [k.name for k in BUILTIN_LAYER_KINDS]
    info = next(p for p in sc.plugins() if p.name == "builtin")
    assert info.status == "loaded"
    mha = nn.MultiheadAttention(8, 2)
    table = {
        nn.Linear(4, 3): "linear",
        nn.LazyLinear(3): "linear",
        mha.out_proj: "linear",  # NonDynamicallyQuantizableLinear, a Linear subclass
        nn.Bilinear(2, 3, 4): "bilinear",
        nn.Conv1d(2, 3, 3): "conv",
        nn.Conv2d(2, 3, 3): "conv",
        nn.Conv3d(2, 3, 3): "conv",
        nn.ConvTranspose1d(2, 3, 3): "conv_transpose",
        nn.ConvTranspose2d(2, 3, 3): "conv_transpose",
        nn.ConvTranspose3d(2, 3, 3): "conv_transpose",
        mha: "attention",
        nn.Embedding(5, 4): "embedding",
        nn.EmbeddingBag(5, 4): "embedding",
        nn.LayerNorm(4): None,
        nn.BatchNorm2d(4): None,
    }
    for module, name in table.items():
        kind = kind_of(module)
        assert (kind.name if kind else None) == name, type(module).__name__
    assert layout_of(nn.Conv2d(2, 3, 3), "bias").kind is None  # a kind knows its weights only
    separate = nn.MultiheadAttention(8, 2, kdim=6, vdim=5)
    assert {n: layout_of(separate, n).kind for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")} == dict.fromkeys(
        ("q_proj_weight", "k_proj_weight", "v_proj_weight"), "attention"
    )


def test_layer_kinds_are_validated_when_made():
    with pytest.raises(ValueError, match="LayerKind name"):
        sc.LayerKind("no:colon", (nn.Linear,))
    with pytest.raises(ValueError, match="output_axis and input_axis are both 0"):
        sc.LayerKind("odd", (nn.Linear,), output_axis=0, input_axis=0)
    with pytest.raises(TypeError, match="module_types"):
        sc.LayerKind("odd", (3,))


# -- default coverage per model family -----------------------------------------------------------
def test_resnet_like_default_covers_every_conv_and_the_classifier():
    model = ResNetLike()
    blocks = [f"layer1.{b}.{c}.weight" for b in (0, 1) for c in ("conv1", "conv2", "conv3", "downsample.0")]
    assert set(covered(model)) == {"conv1.weight", *blocks, "fc.weight"}
    assert "fc.bias" not in covered(model) and not any(".bn" in n for n in covered(model))
    # one-liners: only the convolutions; the blocks only
    assert set(covered(model, {"include": ["conv:*"]})) == {"conv1.weight", *blocks}
    assert set(covered(model, {"include": ["conv:layer*"]})) == set(blocks)


def test_vit_like_default_covers_attention_in_proj_and_every_linear():
    model = ViTLike()
    per_layer = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]
    blocks = {f"encoder.layers.{i}.{n}" for i in (0, 1) for n in per_layer}
    assert set(covered(model)) == {"conv_proj.weight", *blocks, "head.weight"}
    # not the class token, the position table, norms or biases
    assert set(covered(model, {"include": ["attention:*", "linear:encoder.*"]})) == blocks


def test_embeddings_norms_biases_and_a_tied_head_are_not_covered_by_default():
    model = TiedLM()
    assert covered(model) == ["block.0.weight", "block.2.weight"]
    # the head is one tensor with the embedding: covered once when asked for, by either name
    for args in ({"include": ["head.weight"]}, {"include": ["linear:*"]}, {"include": ["embedding:embed.*"]}):
        selection = select_tensors(model, sc.create_sparsifier("magnitude", args))
        assert "embed.weight" in selection.tensors and "head.weight" not in selection.tensors
        assert selection.aliases["embed.weight"] == ("embed.weight", "head.weight")
    # the tied head's layout and owner are the Linear's (wanda observes its activations)
    selection = select_tensors(model, sc.create_sparsifier("magnitude", {"include": ["head.weight"]}))
    assert selection.owners["embed.weight"][0] is model.head and selection.layouts["embed.weight"].kind == "linear"


def test_kind_selectors_and_their_errors():
    model = ResNetLike()
    with pytest.raises(ValueError, match=r"unknown layer kind 'lineer'.*linear, bilinear, conv"):
        covered(model, {"include": ["lineer:*"]})
    assert covered(model, {"include": ["Linear:*"]}) == ["fc.weight"]  # case-insensitive
    assert covered(model, {"exclude": ["conv:*"]}) == ["fc.weight"]
    # a name that holds ':' (a mapping key) is matched with '[:]'
    report = sc.sparsify({"enc:w": torch.randn(8), "dec:w": torch.randn(8)}, "magnitude", {"include": ["enc[:]*"]})
    assert list(report) == ["enc:w"]
    with pytest.raises(ValueError, match=r"'enc\[:\]\*'"):
        sc.sparsify({"enc:w": torch.randn(8)}, "magnitude", {"include": ["enc:*"]})
    # a kind pattern in overrides
    sp = sc.create_sparsifier("magnitude", {"sparsity_level": 0.5, "overrides": {"linear:*": {"sparsity_level": 0.25}}})
    controller = SparsityController(model, sp)
    assert controller.final_levels["fc.weight"] == 0.25 and controller.final_levels["conv1.weight"] == 0.5


def test_capabilities_narrow_the_default_and_refuse_an_explicit_tensor_outside_them():
    class LinearOnly(sc.ScoreSparsifier):
        name = "linear_only"
        capabilities = sc.Capabilities(layer_kinds=frozenset({"linear"}), tensor_ranks=frozenset({2}))

        def score(self, name, tensor):
            return tensor.abs()

    model = ResNetLike()
    assert covered(model, sparsifier=LinearOnly) == ["fc.weight"]
    with pytest.raises(ValueError, match=r"cannot sparsify 'conv1.weight' \(Conv2d, layer kind 'conv', rank 4\).*layer kinds \['linear'\]"):
        covered(model, {"include": ["*.weight"]}, sparsifier=LinearOnly)
    with pytest.raises(ValueError, match=r"covers no tensor.*left out as outside what it supports"):
        covered(nn.Sequential(nn.Conv2d(2, 2, 3)), sparsifier=LinearOnly)


# -- orientation: N:M and blocks along the reduction axis of each kind ----------------------------
def _hardware(kind_module: nn.Module, attr: str = "weight") -> torch.Tensor:
    """The weight as the matmul sees it, [outputs, ..., inputs]: 2:4 groups are 4 consecutive inputs."""
    w = getattr(kind_module, attr).detach()
    if isinstance(kind_module, nn.modules.conv._ConvTransposeNd):
        return w.movedim(0, -1).reshape(w.shape[1], -1, w.shape[0])  # [out, kernel, in]
    if isinstance(kind_module, nn.modules.conv._ConvNd):
        return w.movedim(1, -1).reshape(w.shape[0], -1, w.shape[1])  # [out, kernel, in]
    return w.reshape(w.shape[0], 1, -1)


ORIENTED = {
    "linear": lambda: nn.Linear(16, 8),
    "conv1d": lambda: nn.Conv1d(8, 4, 3),
    "conv2d": lambda: nn.Conv2d(8, 4, 3),
    "conv3d": lambda: nn.Conv3d(8, 4, 2),
    "conv_transpose2d": lambda: nn.ConvTranspose2d(8, 4, 3),
    "attention": lambda: nn.MultiheadAttention(16, 2),
}


@pytest.mark.parametrize("kind", list(ORIENTED))
def test_nm_groups_run_along_the_input_axis_of_each_kind(kind):
    torch.manual_seed(0)
    module = ORIENTED[kind]()
    attr = "in_proj_weight" if kind == "attention" else "weight"
    with torch.no_grad():
        getattr(module, attr).copy_(torch.randn_like(getattr(module, attr)))
    before = _hardware(module, attr).clone()
    sc.sparsify(module, "magnitude", {"pattern": "2:4", "include": [attr]})
    hw = _hardware(module, attr)
    groups = hw.reshape(hw.shape[0], hw.shape[1], -1, 4)
    assert ((groups != 0).sum(-1) == 2).all()  # exactly 2 of every 4 consecutive inputs kept
    # and they are the 2 largest of their group
    kept_min = before.abs().reshape(groups.shape).masked_fill(groups == 0, float("inf")).amin(-1)
    pruned_max = before.abs().reshape(groups.shape).masked_fill(groups != 0, -1.0).amax(-1)
    assert (pruned_max <= kept_min).all()


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv_transpose2d"])
def test_blocks_run_along_the_input_axis_too(kind):
    torch.manual_seed(1)
    module = ORIENTED[kind]()
    sc.sparsify(module, "magnitude", {"pattern": "1x4", "sparsity_level": 0.5, "include": ["weight"]})
    groups = _hardware(module).reshape(*_hardware(module).shape[:2], -1, 4) != 0
    assert (groups.all(-1) | ~groups.any(-1)).all()  # each block of 4 inputs kept or pruned whole
    assert groups.float().mean().item() == pytest.approx(0.5, abs=0.13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_2_4_linear_passes_torchs_semi_structured_round_trip_on_cpu(dtype):
    torch.manual_seed(2)
    layer = nn.Linear(64, 64).to(dtype)
    sc.sparsify(layer, "magnitude", {"pattern": "2:4"})
    w = layer.weight.detach()
    packed, meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), w)
    assert int((w != 0).sum()) == w.numel() // 2
    # the check can fail: the same weight read along its other axis loses nonzeros
    wrong = w.t().contiguous()
    packed, meta = sparse_semi_structured_from_dense_cutlass(wrong)
    assert not torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta), wrong)


# -- tied weights ----------------------------------------------------------------------------------
def test_a_tied_tensor_is_pruned_once_random_50_stays_50():
    model = TiedLM()
    report = sc.sparsify(model, "random", {"sparsity_level": 0.5, "include": ["embed.weight", "head.weight"]})
    assert list(report) == ["embed.weight"] and report.rows[0].aliases == ("head.weight",)
    assert report["head.weight"] == report["embed.weight"] == 0.5
    assert (model.head.weight == 0).float().mean().item() == 0.5
    assert "head.weight" in report.table() and report.to_dict()["layers"][0]["aliases"] == ["head.weight"]


def test_a_mapping_holding_two_names_of_one_tensor_counts_it_once():
    w = torch.randn(32, 16)
    state = {"embed.weight": w, "fc.weight": torch.randn(8, 16), "head.weight": w}
    view = {"a": w, "b": w.view(32, 16)}  # a second tensor object on the same memory
    report = sc.sparsify(state, "random", {"sparsity_level": 0.5})
    assert list(report) == ["embed.weight", "fc.weight"]
    assert (w == 0).float().mean().item() == 0.5 and report.overall == 0.5
    assert list(sc.sparsify(view, "magnitude", {"sparsity_level": 0.75})) == ["a"]
    assert (w == 0).float().mean().item() == 0.75


def test_rules_match_any_alias_and_conflicts_name_both():
    model = TiedLM()
    # exclude by the head's name works (nothing is covered twice, nothing silently ignored)
    assert covered(model, {"include": ["*.weight"], "exclude": ["*norm*", "head.weight", "embed.weight", "pos.*"]}) == [
        "block.0.weight",
        "block.2.weight",
    ]
    with pytest.raises(ValueError, match=r"include pattern '\*.weight' takes 'embed.weight', exclude pattern 'head.weight' leaves 'head.weight'"):
        covered(model, {"include": ["*.weight"], "exclude": ["head.weight"]})
    # an override on either name applies to the tensor
    sp = sc.create_sparsifier("magnitude", {"include": ["head.weight"], "overrides": {"head.*": {"sparsity_level": 0.25}}})
    assert SparsityController(model, sp).final_levels == {"embed.weight": 0.25}
    with pytest.raises(ValueError, match=r"conflicting overrides.*'embed.weight' matches overrides\['embed.\*'\].*'head.weight' matches overrides\['head.\*'\]"):
        covered(model, {"include": ["head.weight"], "overrides": {"embed.*": {"sparsity_level": 0.5}, "head.*": {"sparsity_level": 0.25}}})


# -- per-tensor bounds in global scope -------------------------------------------------------------
def _global_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # a head of tiny weights: one global threshold would empty it
        w = model[1].weight
        w.copy_(w.sign() * (10.0 + w.abs()))  # a layer of large weights, all above the others: it would stay dense
    return model


def _zeros(model: nn.Module) -> list[int]:
    return [int((m.weight == 0).sum()) for m in model]


def _largest_kept(model: nn.Module, before: list[torch.Tensor]) -> bool:
    """Within each tensor, no pruned weight is larger than a kept one."""
    for layer, w in zip(model, before):
        kept = layer.weight.detach() != 0
        if kept.any() and (~kept).any() and w.abs()[~kept].max() > w.abs()[kept].min():
            return False
    return True


def test_global_scope_caps_each_tensor_and_still_meets_the_level_exactly():
    model = _global_model()
    before = [m.weight.detach().clone() for m in model]
    numels = [w.numel() for w in before]  # 4096, 4096, 640
    target = round(0.6 * sum(numels))
    sc.sparsify(model, "magnitude", {"sparsity_level": 0.6, "scope": "global"})
    # one threshold would prune the tiny head and the small first layer whole; both stop at the
    # default cap (0.98), and the huge layer gives the rest: the total is exact
    assert _zeros(model) == [int(0.98 * 4096), target - int(0.98 * 4096) - int(0.98 * 640), int(0.98 * 640)]
    assert _largest_kept(model, before)

    model = _global_model()
    args = {"sparsity_level": 0.6, "scope": "global", "max_level_per_tensor": 0.9, "min_level_per_tensor": 0.2}
    report = sc.sparsify(model, "magnitude", args)
    zeros = _zeros(model)
    assert zeros[0] == int(0.9 * 4096) and zeros[2] == int(0.9 * 640) and sum(zeros) == target
    assert all(0.2 <= v <= 0.9 for v in report.values())
    assert _largest_kept(model, before)

    # a minimum: the large layer is pruned to at least 30% though its weights are all larger
    model = _global_model()
    sc.sparsify(model, "magnitude", {"sparsity_level": 0.3, "scope": "global", "min_level_per_tensor": 0.3})
    assert _zeros(model) == [1229, 1229, 192]  # ceil(0.3 * n) each: 0.3 overall leaves no other choice
    model = _global_model()
    sc.sparsify(model, "magnitude", {"sparsity_level": 0.3, "scope": "global"})
    assert _zeros(model)[1] == 0  # without the minimum it keeps everything


def test_bounds_are_validated():
    with pytest.raises(ValueError, match=r"min_level_per_tensor=0.5 is above max_level_per_tensor=0.4"):
        sc.ScoreSpec(min_level_per_tensor=0.5, max_level_per_tensor=0.4)
    with pytest.raises(ValueError, match=r"sparsity_level=0.95 above max_level_per_tensor"):
        sc.ScoreSpec(scope="global", sparsity_level=0.95, max_level_per_tensor=0.9)
    with pytest.raises(ValueError, match=r"sparsity_level=0.1 below min_level_per_tensor"):
        sc.ScoreSpec(scope="global", sparsity_level=0.1, min_level_per_tensor=0.2)
    # the default cap gives way to a global level above it: 1.0 still prunes everything
    assert sc.sparsify(_global_model(), "magnitude", {"sparsity_level": 1.0, "scope": "global"}).overall == 1.0
    sc.ScoreSpec(sparsity_level=0.99, max_level_per_tensor=0.5)  # layer scope: the bounds do not apply


# -- a third-party layer kind, registered by an installed plugin -----------------------------------
QUANT_PLUGIN = """
import torch
from torch import nn
from sparsity_core import LayerKind, hookimpl

SPARSITY_CORE_API = 2

class QuantLinear(nn.Module):
    # stores its weight [in, out] under another name, as some quantization libraries do
    def __init__(self, cin, cout):
        super().__init__()
        self.qweight = nn.Parameter(torch.randn(cin, cout))
        self.scale = nn.Parameter(torch.ones(cout))

    def forward(self, x):
        return (x @ self.qweight) * self.scale

@hookimpl
def register_layer_kinds(register):
    register(LayerKind("qlinear", ("sp_qkind.QuantLinear",), ("qweight",), output_axis=1, input_axis=0))
"""


def test_a_plugin_registers_a_layer_kind_through_the_hook(fake_site):
    fake_site().add("sparsity-plugin-qkind", entry_points={"qkind": "sp_qkind"}, modules={"sp_qkind": QUANT_PLUGIN})
    import sp_qkind

    assert "qlinear" in [k.name for k in layer_kinds()]
    model = nn.Sequential(sp_qkind.QuantLinear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    assert covered(model) == ["0.qweight", "2.weight"]  # covered by default; its scale is not
    assert covered(model, {"include": ["qlinear:*"]}) == ["0.qweight"]
    sc.sparsify(model, "magnitude", {"pattern": "2:4", "include": ["qlinear:*"]})
    inputs_axis = model[0].qweight.detach().t().reshape(8, 4, 4)  # [out, groups, 4] along its inputs
    assert ((inputs_axis != 0).sum(-1) == 2).all()


def test_a_plugin_that_takes_a_builtin_kind_name_fails_alone(fake_site, plugin_source):
    clash = "from torch import nn\nfrom sparsity_core import LayerKind, hookimpl\n\n@hookimpl\ndef register_layer_kinds(register):\n    register(LayerKind('Linear', (nn.Linear,)))\n"
    site = fake_site()
    site.add("sparsity-plugin-clash", entry_points={"clash": "sp_clash_k"}, modules={"sp_clash_k": clash + plugin_source("clashy")})
    with pytest.warns(PluginWarning, match=r"layer kind 'Linear' registered by plugin 'clash' is already registered by plugin 'builtin'"):
        names = sc.list_sparsifiers()
    assert "clashy" not in names and "magnitude" in names  # all of the plugin's registrations or none
    assert [k.name for k in layer_kinds()] == [k.name for k in BUILTIN_LAYER_KINDS]
