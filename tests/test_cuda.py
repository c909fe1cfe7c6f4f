"""The CUDA paths, on the GPU of whoever runs `make test` where there is one (skipped, with the reason, elsewhere).

Small enough for a 6 GB card: the embedded SmolLM2-135M-Instruct, micro-batches of 2, a few steps each. What each
test asserts is in its name and docstring; tolerances are stated where they are enforced.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from psft_lite.core.errors import Interrupted
from psft_lite.model import loading, scoring
from psft_lite.recipe.schema import load_recipe
from psft_lite.training import checkpoint, trainer
from psft_lite.training.build import build
from psft_lite.training.loop import train_loop
from psft_lite.training.step import train_step

from conftest import QUIET, ROOT, make_recipe

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (run `make test` on a machine with one)"
    ),
]
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _recipe(tmp_path, embedded_dir, model=None, **sections):
    model_keys = {"device": "cuda", "dtype": "auto", "load_in_4bit": True, "double_quant": True, **(model or {})}
    train_keys = {"max_steps": 6, "lr": 5e-3, "batch_size": 4, "micro_batch_size": 2, "schedule": "constant"}
    train_keys.update(sections.pop("train", {}))
    return make_recipe(tmp_path, embedded_dir, model=model_keys, train=train_keys, **sections)


def _train(tmp_path, embedded_dir, **sections):
    run = build(load_recipe(_recipe(tmp_path, embedded_dir, **sections)), QUIET)
    trainer.prepare_run_dir(run)
    before = [p.detach().clone() for p in scoring.trainable_parameters(run.model)]
    records = train_loop(run)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(scoring.trainable_parameters(run.model), before))
    return run, records, moved


OBJECTIVES = {
    "sft": {"kind": "sft"},
    "psft-snapshot": {"kind": "psft", "old_policy": "snapshot", "refresh_every": 3},
    "psft-base": {"kind": "psft", "old_policy": "base"},
    "idft": {"kind": "idft"},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_qlora_nf4_double_quant_trains_every_objective(tmp_path, embedded_dir, name):
    """4-bit NF4 + double quant on CUDA: NLL falls, the adapter moves, the base stays 4-bit, psft clips."""
    run, recs, moved = _train(tmp_path, embedded_dir, objective=OBJECTIVES[name], train={"max_steps": 8})
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in run.model.modules())
    assert {p.device.type for p in scoring.trainable_parameters(run.model)} == {"cuda"}
    assert {p.dtype for p in scoring.trainable_parameters(run.model)} == {torch.float32}  # LoRA weights stay fp32
    assert all(math.isfinite(r["loss"]) for r in recs) and "skipped" not in recs[-1]
    assert sum(r["nll"] for r in recs[-2:]) < sum(r["nll"] for r in recs[:2])
    assert moved > 0
    if name.startswith("psft"):
        assert max(r["clip_frac"] for r in recs) > 0
    assert recs[-1]["peak_mem_mb"] > 0


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_steps(tmp_path, embedded_dir, dtype):
    """bf16 autocast (where the GPU has it) and fp16 with dynamic loss scaling: finite, learning, scale logged."""
    if dtype == "bf16" and not BF16:
        pytest.skip("this GPU has no bf16")
    run, recs, moved = _train(tmp_path, embedded_dir, model={"dtype": dtype, "load_in_4bit": False})
    assert moved > 0 and all(math.isfinite(r["nll"]) for r in recs)
    if dtype == "fp16":
        assert run.scaler is not None and all(r["loss_scale"] > 0 for r in recs)
        assert sum(1 for r in recs if "overflow" not in r) >= 4  # most steps update
    else:
        assert run.scaler is None and "loss_scale" not in recs[-1]


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers(tmp_path, embedded_dir, optimizer):
    """bitsandbytes' 8-bit (and paged) AdamW are used on CUDA and train."""
    import bitsandbytes as bnb

    run, recs, moved = _train(tmp_path, embedded_dir, train={"optimizer": optimizer})
    cls = bnb.optim.PagedAdamW8bit if optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    assert type(run.optimizer) is cls
    assert moved > 0 and recs[-1]["nll"] < recs[0]["nll"]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, embedded_dir):
    """Checkpointing recomputes activations; in fp32 the loss must agree to 1e-5 and the grad norm to 1e-4 (rel)."""
    out = []
    for gc in (False, True):
        keys = {"dtype": "fp32", "load_in_4bit": False, "gradient_checkpointing": gc}
        run = build(load_recipe(_recipe(tmp_path / str(gc), embedded_dir, model=keys)), QUIET)
        out.append(train_step(run, 0))
    assert math.isclose(out[0]["loss"], out[1]["loss"], rel_tol=1e-5)
    assert math.isclose(out[0]["grad_norm"], out[1]["grad_norm"], rel_tol=1e-4)


def test_chunked_head_matches_naive_on_cuda_with_gradients():
    """The chunked LM head (response positions only, float32 chunks) against full logits, on CUDA, fp32 and bf16."""
    from psft_lite.model.logprobs import logprobs_from_logits, target_logprobs

    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        B, L, H, V = 2, 9, 64, 4099
        hidden = torch.randn(B, L, H, device="cuda", dtype=dtype, requires_grad=True)
        weight = (torch.randn(V, H, device="cuda") / 8).to(dtype).requires_grad_()
        targets = torch.randint(0, V, (B, L), device="cuda")
        mask = torch.rand(B, L, device="cuda") < 0.6
        logp, ent = target_logprobs(hidden, weight, targets, mask, chunk=5)
        g = torch.autograd.grad(logp.sum(), [hidden, weight])
        ref, ref_ent = logprobs_from_logits((hidden.float() @ weight.float().t()), targets)
        g_ref = torch.autograd.grad((ref * mask).sum(), [hidden, weight])
        torch.testing.assert_close(logp.float(), (ref * mask).detach(), atol=tol, rtol=tol)
        torch.testing.assert_close(ent.float(), (ref_ent * mask).detach(), atol=tol, rtol=tol)
        for a, r in zip(g, g_ref):
            torch.testing.assert_close(a.float(), r.float(), atol=tol, rtol=tol)


def test_merge_of_a_4bit_cuda_run_is_exact(tmp_path, embedded_dir):
    """Dequantize-then-merge on a CUDA QLoRA run: the merge's own check passes with full greedy agreement."""
    from psft_lite.exporting.merge import merge

    run, _, _ = _train(tmp_path, embedded_dir, train={"max_steps": 3})
    checkpoint.save_adapter(run.model, run.tokenizer, run.run_dir / "adapter", trainer.adapter_meta(run, 3))
    del run
    torch.cuda.empty_cache()
    report = merge(tmp_path / "run" / "adapter", out=tmp_path / "merged", console=QUIET)
    assert report["max_abs_dlogit"] <= report["tolerance"] and report["greedy_agreement"] == 1.0
    assert (tmp_path / "merged" / "config.json").is_file()


def test_resume_on_cuda_continues_the_same_trajectory(tmp_path, embedded_dir):
    """Interrupted after step 2 and resumed equals uninterrupted (losses to 1e-4 relative: cuBLAS is deterministic
    for the same shapes, the tolerance covers atomics in 4-bit kernels)."""
    sections = {"objective": {"kind": "psft", "old_policy": "snapshot", "refresh_every": 3}, "train": {"max_steps": 5}}
    full = build(load_recipe(_recipe(tmp_path / "full", embedded_dir, **sections)), QUIET)
    trainer.prepare_run_dir(full)
    expected = train_loop(full)
    del full
    cut = build(load_recipe(_recipe(tmp_path / "cut", embedded_dir, **sections)), QUIET)
    trainer.prepare_run_dir(cut)
    with pytest.raises(Interrupted):
        train_loop(cut, should_stop=lambda done: done == 2)
    resumed = build(load_recipe(cut.run_dir / "recipe.toml"), QUIET, resuming=True)
    start, _ = trainer.resume_point(resumed, "latest")
    got = train_loop(resumed, start)
    for e, g in zip(expected[2:], got):
        assert e["step"] == g["step"] and math.isclose(e["loss"], g["loss"], rel_tol=1e-4)


def test_peak_memory_against_the_preflight_estimate(tmp_path, embedded_dir):
    """The preflight estimate is for planning: the measured peak allocated memory must not exceed it by more than
    25 %, and must reach at least 20 % of its non-runtime part (else the estimate is uselessly loose)."""
    from psft_lite.training.preflight import estimate_memory

    run, recs, _ = _train(tmp_path, embedded_dir, train={"max_steps": 3})
    longest = max(run.examples, key=len)
    src = loading.resolve_source(run.recipe.model)
    est = estimate_memory(run.recipe, src, run.device, run.dtype, len(longest), longest.n_trained)
    measured = max(r["peak_mem_mb"] for r in recs) * 2**20
    assert measured <= 1.25 * est.total, (measured / 2**30, est.parts)
    assert measured >= 0.2 * (est.total - est.parts["runtime"]), (measured / 2**30, est.parts)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_torchrun_with_nccl_on_two_gpus(tmp_path, embedded_dir):
    """DDP over two GPUs (nccl): exits 0, one metrics record per step, written once by rank 0."""
    recipe = _recipe(tmp_path, embedded_dir, train={"max_steps": 3, "batch_size": 4, "micro_batch_size": 1})
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "psft_lite",
            "train",
            str(recipe),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (sharded training over NCCL)")
def test_sharded_bf16_training_on_two_gpus_tracks_one_gpu_and_refuses_a_4bit_base(tmp_path, embedded_dir):
    """train.strategy = "fsdp" over 2 GPUs (NCCL, bf16): per-step losses within 2e-2 of one GPU's over 6 steps (bf16
    rounding alone moves a run that far, see README "Models bigger than one GPU"), the adapter written once in the
    one-process layout; a 4-bit base is refused before loading, naming the reason."""
    recipe = _recipe(tmp_path, embedded_dir, model={"load_in_4bit": False, "dtype": "bf16" if BF16 else "fp32"})
    one = trainer.run(load_recipe(recipe, [f"output.dir={tmp_path / 'one'}"]), console=QUIET)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "psft_lite"]
    two = tmp_path / "two"
    p = subprocess.run(
        [*launch, "train", str(recipe), "--set", f"output.dir={two}", "--set", "train.strategy=fsdp"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"event"' not in x]
    ref = [json.loads(x) for x in open(one.metrics_file).read().splitlines() if '"event"' not in x]
    assert [r["step"] for r in recs] == [r["step"] for r in ref]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(recs, ref)) < 2e-2
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    q = subprocess.run(
        [*launch, "train", str(recipe), "--set", f"output.dir={tmp_path / 'q'}", "--set", "train.strategy=fsdp",
         "--set", "model.load_in_4bit=true"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert q.returncode != 0 and "cannot be sharded" in q.stderr and not (tmp_path / "q").exists()
