"""How far the top-k reference (`objective.reference_top_k`) moves sft_kl's or asft's objective from the exact one,
measured on a trained run's own checkpoints and training data.

    python bench/reference_topk.py RUN_DIR [--checkpoints step-25,step-200] [--ks 16,64,256] [--examples 64]

For each checkpoint and each k, over the run's first EXAMPLES training examples in its own micro-batches (dropout
off, so every configuration sees the same forward): the token-mean KL to the base, exact and over the top k plus a
tail bucket (the coarse KL is a lower bound: the gap is the part of the KL inside the tail); and the gradient of the
run's loss (token-mean −log p + β·KL, β the run's coefficient) on the LoRA weights, as its cosine with the exact
objective's gradient and its relative error ‖g_k − g‖ / ‖g‖ — the gradient is what training follows. Also the same
two figures for the KL term's gradient alone (what the top-k changes). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--checkpoints", default="step-25,step-200")
    ap.add_argument("--ks", default="16,64,256")
    ap.add_argument("--examples", type=int, default=64)
    args = ap.parse_args()

    import torch
    from peft import set_peft_model_state_dict
    from rich.console import Console
    from safetensors.torch import load_file

    from psft_lite.model import scoring
    from psft_lite.model.logprobs import reference_topk
    from psft_lite.recipe.schema import load_recipe
    from psft_lite.training.build import build
    from psft_lite.training.objectives import OBJECTIVES

    recipe = load_recipe(args.run / "recipe.toml")
    spec = OBJECTIVES[recipe.objective.kind]
    if spec.kl is None:
        sys.exit(f"{args.run}: objective {recipe.objective.kind!r} reads no KL to the base")
    coef = getattr(recipe.objective, spec.params[0])
    with tempfile.TemporaryDirectory() as tmp:
        recipe.output.dir = tmp
        recipe.objective.reference_cache_mb = 0
        run = build(recipe, Console(quiet=True), overwrite=True)
    model = run.model
    model.eval()  # no dropout: every configuration sees the same forward
    params = scoring.trainable_parameters(model)
    head = scoring.lm_head(model)
    ks = [int(k) for k in args.ks.split(",")]
    n_batches = max(1, args.examples // recipe.train.micro_batch_size)
    batches = [b for s in range(n_batches) for b in run.step_batches(s)][:n_batches]
    print(
        f"{args.run}: {recipe.objective.kind} (β {coef}, KL {spec.kl}), {sum(len(b.index) for b in batches)} "
        f"examples, {sum(b.n_trained for b in batches):,} trained tokens, threads {torch.get_num_threads()}\n"
    )
    print("| checkpoint | k | KL exact | KL top-k | gap | loss grad cosine | loss grad rel. error | KL grad cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.checkpoints.split(","):
        set_peft_model_state_dict(model, load_file(args.run / "checkpoints" / name / "adapter_model.safetensors"))
        kl_sums: dict[int, float] = {}  # k (0: exact) → Σ over trained tokens of the KL
        grads: dict[int, torch.Tensor] = {}  # k → gradient of the loss, summed over micro-batches
        kl_grads: dict[int, torch.Tensor] = {}  # k → gradient of the KL term alone
        for b in batches:
            exact = scoring.base_reference(model, b)
            targets = b.input_ids[:, 1:][b.target_mask[:, 1:]]
            refs = {0: exact}
            for k in ks:
                refs[k] = reference_topk(
                    exact.hidden, head.weight, k, head.bias, softcap=head.softcap, scale=head.scale, targets=targets
                )
            for k, ref in refs.items():
                with run.amp():
                    out = scoring.response_outputs(model, b, kl=spec.kl, ref=ref)
                m = b.target_mask.float()
                nll = -(out["logp"] * m).sum() / b.n_trained
                kl = (out["kl"] * m).sum() / b.n_trained
                g_loss = torch.autograd.grad(nll + coef * kl, params, retain_graph=True)
                g_kl = torch.autograd.grad(kl, params)
                kl_sums[k] = kl_sums.get(k, 0.0) + float(kl.detach()) * b.n_trained
                grads[k] = grads.get(k, 0) + torch.cat([g.flatten() for g in g_loss]).double()
                kl_grads[k] = kl_grads.get(k, 0) + torch.cat([g.flatten() for g in g_kl]).double()
        tokens = sum(b.n_trained for b in batches)
        exact_kl = kl_sums[0] / tokens
        g0, gk0 = grads[0], kl_grads[0]
        for k in ks:
            g, gk = grads[k], kl_grads[k]
            top_kl = kl_sums[k] / tokens
            cos = float(torch.nn.functional.cosine_similarity(g, g0, dim=0))
            rel = float((g - g0).norm() / g0.norm())
            cos_kl = float(torch.nn.functional.cosine_similarity(gk, gk0, dim=0))
            print(
                f"| {name} | {k} | {exact_kl:.4f} | {top_kl:.4f} | {100 * (exact_kl - top_kl) / exact_kl:.1f} % "
                f"| {cos:.5f} | {100 * rel:.2f} % | {cos_kl:.4f} |"
            )


if __name__ == "__main__":
    main()
