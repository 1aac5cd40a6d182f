"""GPU checks: the engine's torch kernels on CUDA, packed masks, FSDP2 under NCCL, semi-structured 2:4.

    python benchmarks/gpu.py            # on a machine with a CUDA device (one is enough)
    python benchmarks/gpu.py --smoke    # the same checks, small, on CPU where they can run (no timings)

What CI cannot run (its machine has no GPU), checked where one is lent:

1. *Same masks on CUDA as on CPU*: magnitude (global 90%, per layer 70%, 2:4, 1x4 blocks, channels),
   random and data_norm, in fp32, bf16 and fp16: the CUDA tensors take the torch kernels (sampled
   bracket, ranks in torch), the CPU ones the compiled or NumPy kernels; the masks must be equal.
2. *Speed on the GPU*: one-shot global/per-layer 90% and 2:4 on ~1B bf16 parameters against one
   read+write pass (``w.mul_(1)``), and ``torch.nn.utils.prune.global_unstructured`` beside them.
3. *Packed masks on the GPU*: re-applying after a step, packed (torch unpacking) against a bool
   multiply (the controller holds accelerator masks unpacked while attached: a guess until this), and
   pruned weights staying zero through AdamW steps.
4. *FSDP2 under NCCL*: a one-rank NCCL group, ``fully_shard``, a controller's masks equal to the
   plain model's (the ``TorchCommunicator`` moves the engine's CPU tensors to the device there).
5. *Semi-structured 2:4*: ``to_semi_structured`` on fp16 Linear layers, outputs against the dense
   masked ones, and the time of a matmul against the dense one.
6. *Lightning on the GPU*: ``TrainingAwareSparsity`` through a short fit reaches its level.

Prints one line per check and writes ``gpu.json`` into ``$OUT`` (or the current folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sparsity_core as sc

RESULTS: dict[str, Any] = {}


def check(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> None:
            t0 = time.perf_counter()
            try:
                out = fn(*args)
                RESULTS[name] = {"ok": True, **(out or {})}
            except Exception as exc:  # every check reports; one failing does not stop the others
                RESULTS[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            RESULTS[name]["seconds"] = round(time.perf_counter() - t0, 2)
            print(f"[{'ok' if RESULTS[name]['ok'] else 'FAIL'}] {name}: {json.dumps({k: v for k, v in RESULTS[name].items() if k != 'trace'})}", flush=True)

        return run

    return wrap


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeat: int = 3, before: Callable[[], Any] | None = None) -> float:
    best = float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def stack(width: int, depth: int, dtype: torch.dtype, device: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False, device=device, dtype=dtype) for _ in range(depth)])
    with torch.no_grad():
        for m in model:
            m.weight.normal_()
    return model.requires_grad_(False)


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude global 90%": ("magnitude", {"sparsity_level": 0.9, "scope": "global"}),
    "magnitude layer 70%": ("magnitude", {"sparsity_level": 0.7}),
    "magnitude 2:4": ("magnitude", {"pattern": "2:4"}),
    "magnitude 1x4 global 80%": ("magnitude", {"sparsity_level": 0.8, "pattern": "1x4", "scope": "global"}),
    "magnitude channel 50%": ("magnitude", {"sparsity_level": 0.5, "pattern": "channel"}),
    "random 50%": ("random", {"sparsity_level": 0.5}),
    "data_norm 1x4 90%": ("data_norm", {"sparsity_level": 0.9, "sparse_block_shape": (1, 4)}),
}


@check("1. same masks on the device as on CPU")
def same_masks(device: str, width: int) -> dict[str, Any]:
    differ = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for case, (name, args) in CASES.items():
            if name == "data_norm" and dtype != torch.float32:
                continue  # data_norm scores block means in float32 either way; one dtype is enough
            here = stack(width, 4, dtype, device, seed=1)
            there = copy.deepcopy(here).cpu()
            sc.sparsify(here, name, args)
            sc.sparsify(there, name, args)
            for (n, a), b in zip(here.named_parameters(), there.parameters()):
                if not torch.equal(a.cpu() == 0, b == 0):
                    differ.append(f"{case} {dtype} {n}: {int(((a.cpu() == 0) != (b == 0)).sum())} of {b.numel()}")
    if differ:
        raise AssertionError("; ".join(differ[:10]))
    return {"cases": len(CASES), "dtypes": 3}


@check("2. one-shot speed on the device against one pass")
def speed(device: str, width: int, depth: int) -> dict[str, Any]:
    model = stack(width, depth, torch.bfloat16, device)
    weights = [m.weight for m in model]
    params = sum(w.numel() for w in weights)

    def redraw() -> None:
        with torch.no_grad():
            for w in weights:
                w.normal_()

    with torch.no_grad():
        one_pass = timed(lambda: [w.mul_(1) for w in weights], device)
    out: dict[str, Any] = {"params": params, "dtype": "bf16", "pass_s": round(one_pass, 4)}
    for case, args in (("global 90%", {"sparsity_level": 0.9, "scope": "global"}), ("layer 90%", {"sparsity_level": 0.9}), ("2:4", {"pattern": "2:4"})):

        def one_shot() -> None:
            c = sc.SparsityController(model, "magnitude", args)
            c._hold_masks = False  # as sparsify(): each mask dropped once applied
            c.step()
            c._squash(trust_masked=True)

        redraw()
        one_shot()  # warm-up: kernels compiled and cached by torch
        seconds = timed(one_shot, device, before=redraw)
        out[f"{case} x pass"] = round(seconds / one_pass, 2)
    import torch.nn.utils.prune as prune

    def anchor() -> None:
        pairs = [(m, "weight") for m in model]
        prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=0.9)
        for m, p in pairs:
            prune.remove(m, p)

    redraw()
    try:
        out["prune.global_unstructured x pass"] = round(timed(anchor, device, repeat=1) / one_pass, 2)
    except Exception as exc:  # its whole-model score vector may not fit
        out["prune.global_unstructured"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


@check("3. packed masks on the device: re-apply and AdamW upkeep")
def packed(device: str, width: int, depth: int) -> dict[str, Any]:
    from sparsity_core._bits import PackedMask

    model = stack(width, depth, torch.bfloat16, device)
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.9})
    c.step()
    packed_masks = c.masks.packed()
    bools = {n: m.to_bool() for n, m in packed_masks.items()}
    tensors = dict(c.tensors)
    with torch.no_grad():
        one_pass = timed(lambda: [t.mul_(1) for t in tensors.values()], device)
        as_packed = timed(lambda: [packed_masks[n].apply_(t) for n, t in tensors.items()], device)
        as_bool = timed(lambda: [t.mul_(bools[n]) for n, t in tensors.items()], device)
    assert all(isinstance(m, PackedMask) for m in packed_masks.values())
    # AdamW steps with the controller attached: pruned weights stay exactly zero
    small = stack(256, 3, torch.float32, device).requires_grad_(True)
    ctrl = sc.SparsityController(small, "magnitude", {"sparsity_level": 0.8})
    ctrl.step()
    opt = torch.optim.AdamW(small.parameters(), lr=1e-2)
    ctrl.attach(opt)
    for _ in range(5):
        opt.zero_grad()
        small(torch.randn(32, 256, device=device)).pow(2).mean().backward()
        opt.step()
    leaked = sum(int(ctrl.tensors[n][~m.to(device)].ne(0).sum()) for n, m in ctrl.masks.items())
    assert leaked == 0, f"{leaked} pruned weights moved"
    return {
        "params": sum(t.numel() for t in tensors.values()),
        "packed apply x pass": round(as_packed / one_pass, 2),
        "bool multiply x pass": round(as_bool / one_pass, 2),
        "packed / bool": round(as_packed / as_bool, 2),
    }


@check("4. FSDP2 under NCCL (one rank): masks equal to the plain model's")
def fsdp2(device: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    backend = "nccl" if device == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        out: dict[str, Any] = {"backend": backend}
        for case, args in (("global 90%", {"sparsity_level": 0.9, "scope": "global"}), ("2:4", {"pattern": "2:4"}), ("layer 70%", {"sparsity_level": 0.7})):
            plain = stack(512, 4, torch.float32, device, seed=3).requires_grad_(True)
            sharded = copy.deepcopy(plain)
            for layer in sharded:
                fully_shard(layer)
            fully_shard(sharded)
            a = sc.SparsityController(plain, "magnitude", args)
            b = sc.SparsityController(sharded, "magnitude", args)
            a.step()
            b.step()
            for n, mask in a.masks.items():
                got = b.masks[n]
                assert torch.equal(mask.cpu(), got.cpu()), f"{case}: {n} differs"
            out[case] = "equal"
            state = b.state_dict()  # gathers the packed bits (one all-gather)
            fresh = sc.SparsityController(sharded, "magnitude", args)
            fresh.load_state_dict(state)
            assert all(torch.equal(fresh.masks[n].cpu(), b.masks[n].cpu()) for n in b.masks)
        return out
    finally:
        dist.destroy_process_group()


@check("5. semi-structured 2:4 on the device")
def semi(device: str, width: int) -> dict[str, Any]:
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    from torch.sparse import SparseSemiStructuredTensor

    from sparsity_core.deploy import to_semi_structured

    out: dict[str, Any] = {}
    for out_features, in_features, batch in ((width, width, 4096), (width, width, 16384), (11008, 4096, 8192)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(in_features, out_features)).half().to(device).requires_grad_(False)
        sc.sparsify(model, "magnitude", {"pattern": "2:4"})
        x = torch.randn(batch, in_features, dtype=torch.float16, device=device)
        dense_out = model(x)
        dense_s = timed(lambda: model(x), device, repeat=20)
        report = to_semi_structured(model)
        assert report.converted == ["0"], report
        sparse_out = model(x)
        sparse_s = timed(lambda: model(x), device, repeat=20)
        torch.testing.assert_close(sparse_out, dense_out, rtol=2e-2, atol=2e-2)
        out[f"{out_features}x{in_features} batch {batch}: semi speedup"] = round(dense_s / sparse_s, 2)
        out["backend"] = report.to_dict().get("backend")
    # CUTLASS forced: on compute capability 9.x the layers are left dense, with the reason
    if torch.cuda.get_device_capability()[0] >= 9:
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        try:
            model = nn.Sequential(nn.Linear(256, 256)).half().to(device).requires_grad_(False)
            sc.sparsify(model, "magnitude", {"pattern": "2:4"})
            report = to_semi_structured(model)
            assert report.converted == [] and "8.x only" in report.device_note, report
            out["CUTLASS forced on 9.x"] = "left dense, reason given"
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return out


@check("6. Lightning fit on the device with TrainingAwareSparsity")
def lightning_fit(device: str) -> dict[str, Any]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from sparsity_core.lightning import TrainingAwareSparsity

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    data = DataLoader(TensorDataset(torch.randn(256, 32), torch.randint(0, 4, (256,))), batch_size=32)
    net = Net()
    callback = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.8}, scheduler="cubic", scheduler_args={"start": 0, "end": 2})
    trainer = pl.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_epochs=3, callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(net, data)
    levels = {n: float((p == 0).float().mean()) for n, p in net.net.named_parameters() if n.endswith("weight")}
    assert all(abs(v - 0.8) < 0.01 for v in levels.values()), levels
    return {"levels": {k: round(v, 4) for k, v in levels.items()}, "device": str(next(net.parameters()).device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small and on CPU where no CUDA device is")
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--depth", type=int, default=16, help="layers of width x width (default 16: 1.07B parameters)")
    parser.add_argument("--only", default="1,2,3,4,5,6", help="comma-separated check numbers (default all)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.width, args.depth = 256, 2
    from sparsity_core._engine import native

    RESULTS["environment"] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "sparsity_core": sc.__version__,
        "compiled kernels": native.AVAILABLE,
        "avx2": native.simd(),
    }
    print(json.dumps(RESULTS["environment"]), flush=True)
    todo = {int(x) for x in args.only.split(",")}
    checks: dict[int, Callable[[], None]] = {
        1: lambda: same_masks(device, 512 if not args.smoke else 64),
        2: lambda: speed(device, args.width, args.depth),
        3: lambda: packed(device, args.width, args.depth),
        4: lambda: fsdp2(device),
        5: lambda: semi(device, 4096 if not args.smoke else 256),
        6: lambda: lightning_fit(device),
    }
    for number, run in checks.items():
        if number in todo:
            run()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and v.get("ok") is False]
    print("failed:", failed or "none", flush=True)


if __name__ == "__main__":
    main()
