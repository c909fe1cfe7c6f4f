"""Expected losses: the first steps of each objective on the real embedded model, pinned (as torchtune pins its
recipes' losses). A change that moves them changed the math, the data pipeline or the model loading; if it was meant,
re-pin with `python tests/test_regression.py` and say why in the commit.

fp32 is deterministic on a CPU, so its tolerance is round-off; bf16 depends on the CPU's bf16 kernels, so it is only
checked where the CPU computes bf16 (avx512_bf16) and with a tolerance of a bf16 ulp or two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from conftest import make_recipe  # noqa: E402

OBJECTIVES = {
    "sft": {"kind": "sft"},
    "sft_kl": {"kind": "sft_kl", "kl_coef": 0.1},  # the top-k reference (the default objective.reference_top_k)
    "sft_kl-exact": {"kind": "sft_kl", "kl_coef": 0.1, "reference_top_k": 0},
    "dft": {"kind": "dft"},
    "idft": {"kind": "idft"},
    "psft-base": {"kind": "psft", "old_policy": "base"},
    "psft-snapshot": {"kind": "psft", "old_policy": "snapshot", "refresh_every": 2},
}
CASES = [("fp32", m) for m in OBJECTIVES] + [("bf16", "psft-base")]
TOLERANCE = {"fp32": 2e-5, "bf16": 2e-2}  # absolute, on losses of order 1
STEPS = 3  # with refresh_every 2, the snapshot's third step is a refresh: its ratio is exactly 1 again

#: (dtype, method) -> per-step (loss, nll) of the first STEPS optimizer steps
EXPECTED: dict[str, list[list[float]]] = {
    "fp32/sft": [[0.839716, 0.839716], [1.168148, 1.168148], [0.929288, 0.929288]],
    "fp32/sft_kl": [[0.839715, 0.839715], [1.180685, 1.168148], [0.936383, 0.930419]],
    "fp32/sft_kl-exact": [[0.839716, 0.839716], [1.180701, 1.168148], [0.936413, 0.930415]],
    "fp32/dft": [[0.133603, 0.839716], [0.156254, 1.17297], [0.112053, 0.996965]],
    "fp32/idft": [[0.155441, 0.839716], [0.198521, 1.243728], [0.12492, 1.029284]],
    "fp32/psft-base": [[-1.0, 0.839716], [-1.054744, 1.168148], [-1.04044, 0.946168]],
    "fp32/psft-snapshot": [[-1.0, 0.839716], [-1.054744, 1.168148], [-1.0, 0.946168]],
    "bf16/psft-base": [[-1.0, 0.847988], [-1.049813, 1.210607], [-1.040877, 0.973879]],
}


def first_steps(tmp_path: Path, dtype: str, method: str) -> list[list[float]]:
    from psft_lite.model import loading
    from psft_lite.recipe.schema import load_recipe
    from psft_lite.training.build import build
    from psft_lite.training.step import train_step

    recipe = make_recipe(
        tmp_path,
        loading.EMBEDDED_MODEL,
        model={"dtype": dtype},
        objective=OBJECTIVES[method],
        train={"max_steps": STEPS, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3, "log_every": 1},
    )
    run = build(load_recipe(recipe), Console(quiet=True))
    return [[rec["loss"], rec["nll"]] for rec in (train_step(run, s) for s in range(STEPS))]


@pytest.mark.slow
@pytest.mark.parametrize("dtype,method", CASES, ids=[f"{d}-{m}" for d, m in CASES])
def test_first_losses_are_pinned(tmp_path, embedded_dir, dtype, method):
    from psft_lite.model import runtime

    if dtype == "bf16" and not runtime.cpu_has_bf16():
        pytest.skip("this CPU does not compute bf16 (no avx512_bf16): the bf16 pins do not apply")
    got = first_steps(tmp_path, dtype, method)
    want = EXPECTED[f"{dtype}/{method}"]
    flat = lambda rows: [x for row in rows for x in row]  # noqa: E731
    assert flat(got) == pytest.approx(flat(want), abs=TOLERANCE[dtype]), (got, want)


if __name__ == "__main__":  # re-pin: prints the EXPECTED table to paste above
    import tempfile

    pins = {}
    for dtype, method in CASES:
        with tempfile.TemporaryDirectory() as d:
            pins[f"{dtype}/{method}"] = [[round(x, 6) for x in row] for row in first_steps(Path(d), dtype, method)]
    print(json.dumps(pins, indent=4))
