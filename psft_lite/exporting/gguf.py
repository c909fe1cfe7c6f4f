"""`psft-lite export`: a fine-tune as GGUF for llama.cpp, Ollama and LM Studio, proven in llama.cpp.

The adapter is merged exactly as `psft-lite merge` merges it (merge.merged_model: a 4-bit base is dequantized
first), in float32, and converted by psft-lite's own converter (gguf_convert). Legacy types (f32/f16/bf16/q8_0/
q4_0) are written by the gguf package; K-quants by llama.cpp's own quantizer from a float32 GGUF. Each file is
written under a temporary name, checked in llama.cpp (gguf_check: tokenizer, logits, greedy end-of-turn) and only
then renamed into place, so an interrupted or failed export leaves nothing at --out. Beside it: an Ollama Modelfile
whose TEMPLATE reproduces the run's chat template (ollama.py) and a model card (README.md).

`--adapter-only` writes the LoRA adapter as a llama.cpp LoRA GGUF instead, applied to a base GGUF (the base the run
came from when it was a GGUF, e.g. the embedded default; otherwise the base exported next to it).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from psft_lite.core.errors import ModelError, RunError
from psft_lite.core.files import atomic_write_text, partial_name
from psft_lite.core.rundir import is_run_dir, metrics_file, recipe_file
from psft_lite.exporting import gguf_check, gguf_convert, ollama
from psft_lite.exporting.gguf_convert import Quant
from psft_lite.model import loading, runtime
from psft_lite.model.adapters import run_conversations
from psft_lite.model.chat import FALLBACK_PROMPTS, stop_ids, stop_tokens


@dataclass
class Source:
    """What is exported: an adapter on its base (a run) or a plain transformers model folder."""

    label: str
    config: Any
    tokenizer: Any
    info: Any = None  # merge.AdapterInfo for a run/adapter
    model_dir: Path | None = None  # a plain model folder
    base_gguf: Path | None = None  # the base came from this GGUF (its tokenizer metadata is carried over)
    run_dir: Path | None = None


@dataclass
class Target:
    quant: Quant
    path: Path
    tmp: Path | None = None
    check: gguf_check.CheckResult | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def resolve(source: Path) -> Source:
    """A run directory / adapter / checkpoint, or a model folder → what to export. Refuses unsupported
    architectures here, before any work."""
    from transformers import AutoConfig, AutoTokenizer

    from psft_lite.model.adapters import resolve_adapter

    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        raise ModelError(f"{source}: already a GGUF file. Export a run directory, an adapter or a model folder.")
    if source.is_dir() and (source / "config.json").is_file() and not (source / "adapter_config.json").is_file():
        config = AutoConfig.from_pretrained(source)
        gguf_convert.family(config)
        return Source(str(source), config, AutoTokenizer.from_pretrained(source), model_dir=source)
    info = resolve_adapter(source)
    src = loading.resolve_source(info.base)
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(src.path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{info.base.name}: cannot read the base model's config for export: {e}") from None
    gguf_convert.family(config)
    base_gguf = None
    if info.base.name in loading.packaged.PACKAGED:
        base_gguf = loading.packaged.gguf_path(info.base.name)
    elif src.gguf_file:
        base_gguf = Path(src.path) / src.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    return Source(str(info.path), config, tokenizer, info=info, base_gguf=base_gguf, run_dir=info.run_dir)


def _default_out(src: Source, quant: Quant) -> Path:
    root = src.run_dir or (src.model_dir.parent if src.model_dir else Path("."))
    name = (src.run_dir.name if src.run_dir else Path(src.label).name) or "model"
    return root / "gguf" / f"{name}-{quant.name}.gguf"


def targets_for(src: Source, out: Path | None, quants: list[Quant]) -> list[Target]:
    """One file per quant type: --out as given for one type; NAME-<quant>.gguf beside it for several."""
    if out is None:
        return [Target(q, _default_out(src, q)) for q in quants]
    out = Path(out)
    if out.suffix != ".gguf":
        raise ModelError(f"--out {out}: the output is a GGUF file; give a name ending in .gguf.")
    if len(quants) == 1:
        return [Target(quants[0], out)]
    return [Target(q, out.with_name(f"{out.stem}-{q.name}.gguf")) for q in quants]


def check_writable(paths: list[Path], overwrite: bool) -> None:
    """Exit 2 before any work when an output exists (without --overwrite) or its folder cannot be written."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise ModelError(
            f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass --overwrite to replace, "
            "or choose another --out."
        )
    for folder in sorted({p.parent for p in paths}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".psft-write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise ModelError(f"cannot write to {folder}: {e.strerror or e}. Choose another --out.") from None


def _merged_state(src: Source) -> tuple[Any, str]:
    """The merged model in float32 (exactly merge's merge), and how it was made."""
    from transformers import AutoModelForCausalLM

    from psft_lite.exporting.merge import merged_model

    if src.model_dir is not None:
        return AutoModelForCausalLM.from_pretrained(src.model_dir, dtype=torch.float32), "model folder"
    info = src.info
    device = torch.device("cpu")
    how = "dequantized 4-bit base + adapter" if info.base.load_in_4bit else "base + adapter"
    return merged_model(info, device, info.train_dtype(device), torch.float32, False), how


def _base_state(src: Source) -> Any:
    """The base weights the adapter was trained on, float32 (a 4-bit base dequantized, as in the merge)."""
    from psft_lite.model.adapters import base_as_trained

    device = torch.device("cpu")
    return base_as_trained(src.info, device, src.info.train_dtype(device), torch.float32, False)


def _tokenizer_meta(src: Source) -> gguf_convert.TokenizerMeta:
    if src.base_gguf is not None:
        return gguf_convert.tokenizer_from_gguf(src.base_gguf, src.tokenizer.chat_template, src.tokenizer)
    return gguf_convert.tokenizer_from_hf(src.tokenizer, src.config, src.label)


@torch.no_grad()
def reference(
    src: Source, model: Any, n_seq: int = 4, n_prompts: int = 3, max_len: int = 192, max_new_tokens: int = 128
) -> gguf_check.Reference:
    """Texts, sequences with the merged model's logits, and chat prompts, from the run's own data."""
    tok = src.tokenizer
    convs = run_conversations(src.run_dir, max(n_seq, n_prompts))
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in convs]
    if not rendered:
        rendered = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": "I can help with that."}],
                tokenize=False,
            )
            for p in FALLBACK_PROMPTS
        ]
    prompt_msgs = [[m for m in c if m["role"] != "assistant"][:2] for c in convs[:n_prompts]] or [
        [{"role": "user", "content": p}] for p in FALLBACK_PROMPTS[:n_prompts]
    ]
    prompts_text = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompt_msgs]
    texts = rendered + prompts_text + [m[-1]["content"] for m in prompt_msgs] + gguf_check.AWKWARD_STRINGS
    model.eval()
    sequences, logits = [], []
    for text in rendered[:n_seq]:
        ids = gguf_check.hf_ids(tok, text)[:max_len]
        sequences.append(list(ids))
        logits.append(model(input_ids=torch.tensor([ids])).logits[0].float().numpy())
    prompts = [gguf_check.hf_ids(tok, t) for t in prompts_text]
    eot = set(stop_ids(tok))
    return gguf_check.Reference(
        texts, sequences, logits, prompts, _greedy_lengths(model, tok, prompts, eot, max_new_tokens), eot, tok
    )


def _greedy_lengths(model: Any, tok: Any, prompts: list[list[int]], eot: set[int], max_new: int) -> list[int | None]:
    """How many tokens the merged model's own greedy answer to each prompt takes, end-of-turn included (None: it did
    not end within `max_new`). One left-padded batch: a 135M model on a CPU spends its time per step, not per row."""
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eot)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(eot),
        pad_token_id=pad,
    )[:, width:].tolist()
    lengths: list[int | None] = []
    for row in out:
        end = next((i for i, t in enumerate(row) if t in eot), None)
        lengths.append(None if end is None else end + 1)
    return lengths


def _general(src: Source) -> dict[str, str]:
    name = src.run_dir.name if src.run_dir else Path(src.label).name
    g = {"name": name, "finetune": "psft-lite"}
    if src.info is not None:
        g["base_model.0.name"] = str(src.info.base.name)
    return g


def _quantize_with_llama_cpp(f32: Path, out: Path, quant: Quant) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(quant.file_type)
    params.nthread = max(1, os.cpu_count() or 1)
    with gguf_check._quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if rc != 0:
        raise RunError(f"llama.cpp's quantizer failed ({rc}) writing {quant.name}.")


def export(
    source: Path,
    out: Path | None = None,
    quant: str = "q8_0",
    adapter_only: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Export and check; returns the report. On failure nothing is left at the output paths (exit 1)."""
    console = console or Console(stderr=True)
    runtime.quiet_transformers()
    quants = gguf_convert.parse_quants(quant)
    kq = [q.name for q in quants if gguf_convert.needs_llama_cpp(q)]
    if kq:
        gguf_check.require(f"the K-quant type{'s' if len(kq) > 1 else ''} {', '.join(kq)}")
    if verify:
        gguf_check.require("The export check (run in llama.cpp; --no-verify skips it)")
    src = resolve(source)
    if adapter_only and src.info is None:
        raise ModelError(f"{source}: --adapter-only exports a run's adapter; this is a plain model folder.")
    if adapter_only:
        return _export_adapter(src, out, quants[0], overwrite, verify, console)
    targets = targets_for(src, out, quants)
    folder = targets[0].path.parent
    check_writable([t.path for t in targets] + [folder / "Modelfile", folder / "README.md"], overwrite)
    t0 = time.perf_counter()
    console.print(f"merging {src.label} in float32 and converting ({', '.join(q.name for q in quants)})")
    model, how = _merged_state(src)
    ref = reference(src, model) if verify else None
    meta, config, state = _tokenizer_meta(src), model.config, dict(model.state_dict())
    del model
    merge_s = time.perf_counter() - t0
    with _partial_files(targets, folder) as f32_tmp:
        _write_targets(src, targets, state, config, meta, f32_tmp)
        del state
        if verify:
            _check_targets(targets, ref, console)
        for t in targets:
            os.replace(t.tmp, t.path)
            t.tmp = None
    report = _report(src, targets, how, merge_s, ref)
    fmt = ollama.chat_format(src.tokenizer)
    _write_side_files(src, targets[0].path, None, fmt, report, folder)
    _print_usage(console, src, targets[0].path, folder, fmt)
    return report


@contextlib.contextmanager
def _partial_files(targets: list[Target], folder: Path) -> Iterator[Path]:
    """Yields the float32 GGUF's temporary path (written only when a K-quant needs it); every temporary file the
    export made is removed on the way out, whatever happened."""
    f32_tmp = folder / f".psft-export-f32-{os.getpid()}.gguf"
    try:
        yield f32_tmp
    finally:
        for t in targets:
            if t.tmp is not None:
                t.tmp.unlink(missing_ok=True)
        f32_tmp.unlink(missing_ok=True)


def _write_targets(src: Source, targets: list[Target], state: dict, config: Any, meta: Any, f32_tmp: Path) -> None:
    """Each target under its temporary name: numpy-quantized types directly, K-quants by llama.cpp from float32."""
    legacy = [t for t in targets if not gguf_convert.needs_llama_cpp(t.quant)]
    kquant = [t for t in targets if gguf_convert.needs_llama_cpp(t.quant)]
    if kquant:  # llama.cpp quantizes from a float32 GGUF
        gguf_convert.write_model_gguf(f32_tmp, state, config, meta, gguf_convert.parse_quants("f32")[0], _general(src))
    for i, t in enumerate(legacy):
        s = time.perf_counter()
        t.tmp = partial_name(t.path)
        last = i == len(legacy) - 1
        gguf_convert.write_model_gguf(t.tmp, state, config, meta, t.quant, _general(src), consume=last and not kquant)
        t.seconds = time.perf_counter() - s
    for t in kquant:
        s = time.perf_counter()
        t.tmp = partial_name(t.path)
        _quantize_with_llama_cpp(f32_tmp, t.tmp, t.quant)
        t.seconds = time.perf_counter() - s


def _check_targets(targets: list[Target], ref: gguf_check.Reference, console: Console) -> None:
    """The check in llama.cpp on every written file; any failure raises and nothing is renamed into place."""
    for t in targets:
        t.check = gguf_check.run_checks(t.tmp, ref, t.quant.name)
        _print_check(console, t)
    failed = [t for t in targets if t.check.failures]
    if failed:
        why = "; ".join(f"{t.quant.name}: {', '.join(t.check.failures)}" for t in failed)
        raise RunError(
            f"export check failed in llama.cpp — {why}. Nothing was written to "
            f"{', '.join(str(t.path) for t in targets)}. Use --no-verify to write it anyway."
        )


def _export_adapter(
    src: Source, out: Path | None, quant: Quant, overwrite: bool, verify: bool, console: Console
) -> dict[str, Any]:
    """The LoRA adapter as a llama.cpp LoRA GGUF, and the base GGUF it applies to."""
    from safetensors.torch import load_file

    info = src.info
    adapter_path = (
        Path(out) if out else _default_out(src, quant).with_name(f"{(src.run_dir or info.path).name}-lora.gguf")
    )
    if adapter_path.suffix != ".gguf":
        raise ModelError(f"--out {adapter_path}: the output is a GGUF file; give a name ending in .gguf.")
    folder = adapter_path.parent
    reuse_base = src.base_gguf is not None and not info.base.load_in_4bit
    base_path = src.base_gguf if reuse_base else adapter_path.with_name(f"{adapter_path.stem}-base-{quant.name}.gguf")
    writes = [adapter_path, folder / "Modelfile", folder / "README.md"] + ([] if reuse_base else [base_path])
    if not reuse_base and gguf_convert.needs_llama_cpp(quant):
        raise ModelError("--adapter-only writes its base with the gguf package: choose f32, f16, bf16, q8_0 or q4_0.")
    check_writable(writes, overwrite)
    adapter_cfg = json.loads((info.path / "adapter_config.json").read_text())
    weights = load_file(str(info.path / "adapter_model.safetensors"))
    t0 = time.perf_counter()
    model, how = _merged_state(src) if verify else (None, "")
    ref = reference(src, model) if verify else None
    del model
    targets = [Target(quant, adapter_path)]
    base_tmp = None
    try:
        targets[0].tmp = partial_name(adapter_path)
        n = gguf_convert.write_lora_gguf(targets[0].tmp, weights, adapter_cfg, src.config, _general(src))
        if not reuse_base:
            base = _base_state(src)
            base_tmp = partial_name(base_path)
            gguf_convert.write_model_gguf(
                base_tmp, dict(base.state_dict()), base.config, _tokenizer_meta(src), quant, {"name": info.base.name}
            )
            del base
        targets[0].seconds = time.perf_counter() - t0
        if verify:
            _check_adapter(targets[0], base_tmp or base_path, base_path.name, ref, console)
        os.replace(targets[0].tmp, adapter_path)
        targets[0].tmp = None
        if base_tmp is not None:
            os.replace(base_tmp, base_path)
            base_tmp = None
    finally:
        for p in (targets[0].tmp, base_tmp):
            if p is not None:
                p.unlink(missing_ok=True)
    report = _report(src, targets, f"LoRA adapter ({n} weights) for {base_path}", 0.0, ref)
    report["base_gguf"] = str(base_path)
    fmt = ollama.chat_format(src.tokenizer)
    _write_side_files(src, base_path, adapter_path, fmt, report, folder)
    console.print(f"the adapter applies to the base GGUF {base_path}")
    _print_usage(console, src, base_path, folder, fmt, adapter=adapter_path)
    return report


def _check_adapter(target: Target, base: Path, base_name: str, ref: Any, console: Console) -> None:
    """The adapter GGUF applied to its base GGUF in llama.cpp, held to the base file's quantization noise."""
    tolerance = gguf_check.lora_tolerance(base)
    target.check = gguf_check.run_checks(base, ref, "lora", lora=target.tmp, tolerance=tolerance)
    _print_check(console, target)
    if target.check.failures:
        raise RunError(
            f"export check failed in llama.cpp — adapter on {base_name}: "
            f"{', '.join(target.check.failures)}. Nothing was written to {target.path}. Use --no-verify to write it "
            "anyway."
        )


def _print_check(console: Console, t: Target) -> None:
    c = t.check
    ok = "[green]ok[/green]" if not c.failures else "[red]FAILED[/red]"
    ended = sum(g["ended"] for g in c.greedy)
    console.print(
        f"check {t.quant.name if c.label != 'lora' else 'adapter'} in llama.cpp: tokenizer "
        f"{c.tokenizer_cases - len(c.tokenizer_mismatches)}/{c.tokenizer_cases} identical; logits on {c.positions} "
        f"positions max |Δ| {c.max_abs_dlogit:.3g} (tolerance {c.tolerance[0]:g}), top-1 agreement "
        f"{c.top1_agreement:.1%} (≥ {c.tolerance[1]:.0%}); greedy answers ending with end-of-turn {ended}/"
        f"{len(c.greedy)} — {ok}"
    )


def _report(src: Source, targets: list[Target], how: str, merge_s: float, ref: Any) -> dict[str, Any]:
    rows = []
    for t in targets:
        row = {"quant": t.quant.name, "path": str(t.path), "seconds": round(t.seconds, 2)}
        if t.path.exists():
            row["bytes"] = t.path.stat().st_size
        if t.check is not None:
            row["check"] = t.check.summary()
            row["greedy_example"] = t.check.greedy[0]["text"] if t.check.greedy else None
        rows.append(row)
    return {"source": src.label, "how": how, "merge_seconds": round(merge_s, 2), "files": rows}


def _num_ctx(src: Source) -> int:
    return int(min(getattr(src.config, "max_position_embeddings", 4096) or 4096, 4096))


def _write_side_files(
    src: Source, gguf_path: Path, adapter: Path | None, fmt: Any, report: dict[str, Any], folder: Path
) -> None:
    base_ref = gguf_path.name if gguf_path.parent == folder else str(gguf_path.resolve())
    text = ollama.modelfile(base_ref, fmt, stop_tokens(src.tokenizer), _num_ctx(src), adapter.name if adapter else None)
    if gguf_path.parent != folder:
        text = text.replace(f"FROM ./{base_ref}", f"FROM {base_ref}")
    atomic_write_text(folder / "Modelfile", text)
    atomic_write_text(folder / "README.md", model_card(src, report, fmt, adapter))


def _describe_source(src: Any) -> str:
    """`data/train.jsonl` or `openai/gsm8k (config main, split train)` for the card."""
    extra = [f"{k} {v}" for k, v in (("config", src.config), ("split", src.split), ("revision", src.revision)) if v]
    return src.path if Path(src.path).exists() or extra == ["split train"] else f"{src.path} ({', '.join(extra)})"


def _print_usage(
    console: Console, src: Source, gguf_path: Path, folder: Path, fmt: Any, adapter: Path | None = None
) -> None:
    if fmt is None:
        console.print(
            "[yellow]note:[/yellow] the chat template does not decompose into role prefixes and suffixes, so the "
            "Modelfile has no TEMPLATE; Ollama will need one written by hand."
        )
    name = (src.run_dir.name if src.run_dir else Path(src.label).name).lower() or "psft-model"
    lora = f" --lora {adapter}" if adapter else ""
    console.print("to run it:")
    console.print(f"  ollama create {name} -f {folder / 'Modelfile'} && ollama run {name}", highlight=False)
    console.print(f"  llama-cli -m {gguf_path}{lora} -cnv", highlight=False)


def model_card(src: Source, report: dict[str, Any], fmt: Any, adapter: Path | None) -> str:
    """The README.md written beside an exported GGUF: where it came from, the llama.cpp check, how to run it."""
    lines = [f"# {src.run_dir.name if src.run_dir else Path(src.label).name} (GGUF)", ""]
    lines.append("Exported by `psft-lite export` and checked in llama.cpp before it was written.")
    lines.append("")
    if src.info is not None:
        lines.append(f"- base model: `{src.info.base.name}`")
    if src.run_dir is not None and is_run_dir(src.run_dir):
        lines += _card_run_lines(src.run_dir)
    lines += ["", "## Files and the llama.cpp check", ""]
    lines += _card_check_table(report, adapter)
    ex = next((f.get("greedy_example") for f in report["files"] if f.get("greedy_example")), None)
    if ex:
        lines += ["", "A greedy answer from llama.cpp:", "", "```", ex.strip(), "```"]
    first = Path(report["files"][0]["path"]).name
    lines += [
        "",
        "## Run it",
        "",
        "```sh",
        "ollama create my-model -f Modelfile && ollama run my-model",
        f"llama-cli -m {report.get('base_gguf', first)}" + (f" --lora {adapter.name}" if adapter else "") + " -cnv",
        "```",
        "",
        "The Modelfile's TEMPLATE and stop tokens reproduce the chat template the run trained with"
        + (" (checked against it on sample conversations)." if fmt is not None else "; none could be derived here."),
        "",
    ]
    return "\n".join(lines)


def _card_run_lines(run_dir: Path) -> list[str]:
    """The run's recipe, last step, kept entropy and drift, as model-card bullets."""
    from psft_lite.recipe.schema import load_recipe
    from psft_lite.tracking.metrics import read_metrics, run_outcome

    lines = []
    try:
        r = load_recipe(recipe_file(run_dir))
        obj = r.objective.kind + (f" (old policy: {r.objective.old_policy})" if r.objective.kind == "psft" else "")
        lines += [
            f"- objective: {obj}; LoRA r {r.lora.r}, alpha {r.lora.alpha}; lr {r.train.lr}",
            f"- data: {', '.join(f'`{_describe_source(s)}`' for s in r.data.train)}"
            + (f" (self-replay {r.data.replay.ratio:.0%})" if r.data.replay.ratio else ""),
        ]
    except Exception:
        pass
    steps = [m for m in read_metrics(metrics_file(run_dir)) if "event" not in m and "loss" in m]
    if steps:
        last = steps[-1]
        lines.append(
            f"- final step {last['step']}: loss {last['loss']:.4f}"
            + (f", nll {last['nll']:.3f}" if "nll" in last else "")
            + (f", entropy {last['entropy']:.3f}" if "entropy" in last else "")
        )
    outcome = run_outcome(metrics_file(run_dir))
    if outcome.get("entropy_kept") is not None:
        lines.append(f"- entropy on trained tokens kept: {outcome['entropy_kept']:.0%} of the start")
    if "drift" in outcome:
        lines.append(f"- drift from the base: {outcome['drift']:+.2f} nats (step {outcome['drift_step']})")
    return lines


def _card_check_table(report: dict[str, Any], adapter: Path | None) -> list[str]:
    """One row per written file: its type, size and what the llama.cpp check measured."""
    lines = [
        "| file | type | size | tokenizer | max abs Δlogit | top-1 agreement | ends turn |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report["files"]:
        c = f.get("check")
        size = f"{f['bytes'] / 1e6:.1f} MB" if "bytes" in f else ""
        if not c:
            lines.append(f"| `{Path(f['path']).name}` | {f['quant']} | {size} | not checked | | | |")
            continue
        lines.append(
            f"| `{Path(f['path']).name}` | {f['quant'] if not adapter else 'LoRA'} | {size} | "
            f"{c['tokenizer_cases'] - c['tokenizer_mismatches']}/{c['tokenizer_cases']} | "
            f"{c['max_abs_dlogit']:.3g} (≤ {c['tolerance_max_abs_dlogit']:g}) | {c['top1_agreement']:.1%} | "
            f"{c['greedy_ended']}/{c['greedy_n']} |"
        )
    return lines


def write_gguf(run_dir: Path, output: Any, console: Console) -> dict[str, Any]:
    """`output.save = ["gguf"]`: the finished run exported as `output.gguf_quant`, checked in llama.cpp."""
    report = export(run_dir, quant=output.gguf_quant, overwrite=True, console=console)
    return {"gguf": [f["path"] for f in report["files"]]}
