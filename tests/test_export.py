"""GGUF export: the files llama.cpp loads tokenize and compute like the merged model, the adapter GGUF applied to
its base matches the merged GGUF, the export loads back as a base, and every bad input exits 2 with nothing written."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from psft_lite.core import extras
from psft_lite.core.errors import RunError
from psft_lite.exporting import gguf as export_mod
from psft_lite.exporting import gguf_check, gguf_convert, ollama
from psft_lite.exporting import merge as merge_mod
from psft_lite.model import loading
from psft_lite.recipe.schema import load_recipe
from psft_lite.training import trainer

from conftest import QUIET, make_recipe, run_cli


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """A short LoRA run on the real embedded model (its base is the packaged GGUF)."""
    tmp = tmp_path_factory.mktemp("export-run")
    recipe = load_recipe(
        make_recipe(tmp, loading.EMBEDDED_MODEL, train={"max_steps": 2, "lr": 1e-3}, lora={"r": 4, "alpha": 8})
    )
    trainer.run(recipe, console=QUIET)
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(embedded_run):
    out = embedded_run / "gguf" / "m.gguf"
    report = export_mod.export(embedded_run, out=out, quant="f16,q8_0,q4_k_m", console=QUIET)
    return out.parent, report


def test_export_writes_checked_gguf_modelfile_and_card(exported, embedded_run):
    folder, report = exported
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["Modelfile", "README.md", "m-f16.gguf", "m-q4_k_m.gguf", "m-q8_0.gguf"], names
    by_quant = {f["quant"]: f for f in report["files"]}
    for q, f in by_quant.items():
        c = f["check"]
        assert c["passed"], (q, c)
        assert c["tokenizer_mismatches"] == 0 and c["tokenizer_cases"] >= 15
        assert c["positions"] >= 200 and c["greedy_n"] >= 1 and c["greedy_ended"] >= 1
    assert by_quant["f16"]["check"]["max_abs_dlogit"] < 0.5 and by_quant["f16"]["check"]["greedy_ended"] == 3
    assert by_quant["q8_0"]["bytes"] < by_quant["f16"]["bytes"] / 1.7
    assert by_quant["q4_k_m"]["bytes"] < by_quant["q8_0"]["bytes"]

    # the tokenizer is the source GGUF's, with the run's chat template; the K-quant is llama.cpp's own. Fields read
    # with the header reader (checked field by field against gguf.GGUFReader below; ~40x faster on 49k tokens)
    from psft_lite.exporting import gguf_header

    keys = (
        "tokenizer.ggml.pre",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.tokens",
    )
    header = lambda path: {k: v for k, v, _, _ in gguf_header.fields(path)}  # noqa: E731
    src = header(loading.embedded_gguf_path())
    tok = json.loads((embedded_run / "adapter" / "tokenizer_config.json").read_text())
    template = tok.get("chat_template") or (embedded_run / "adapter" / "chat_template.jinja").read_text()
    for name in ("m-f16.gguf", "m-q4_k_m.gguf"):
        r = header(folder / name)
        for key in keys:
            assert r[key] == src[key], key
        assert r["tokenizer.chat_template"] == template
    kq = gguf.GGUFReader(folder / "m-q4_k_m.gguf")
    assert _field(kq, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert {t.tensor_type.name for t in kq.tensors} & {"Q4_K", "Q5_K", "Q6_K"}

    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./m-f16.gguf" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>assistant\n{{ .Content }}<|im_end|>\n" in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile
    card = (folder / "README.md").read_text()
    assert "m-q8_0.gguf" in card and "ollama create" in card and "objective: sft" in card


def test_the_header_reader_reads_every_field_as_gguf_reader_does():
    from psft_lite.exporting import gguf_header

    path = loading.embedded_gguf_path()
    ours = {key: (value, vtype, sub) for key, value, vtype, sub in gguf_header.fields(path)}
    theirs = gguf.GGUFReader(path).fields
    assert list(ours) == [k for k in theirs if not k.startswith("GGUF.")]
    for key, (value, vtype, sub) in ours.items():
        f = theirs[key]
        assert value == f.contents() and vtype == f.types[0], key
        assert sub == (f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None), key
    assert gguf_header.value(path, "general.architecture") == "llama"
    assert gguf_header.value(path, "no.such.key") is None


def test_k_quant_generates_in_llama_cpp(exported):
    """The K-quant (written by llama.cpp's own quantizer from psft-lite's f16) still knows what the model knew: it
    continues "The capital of France is" with Paris, as the f16 file does, and picks the same first token."""
    folder, _ = exported
    texts = {}
    for q in ("f16", "q4_k_m"):
        with gguf_check.open_llama(folder / f"m-{q}.gguf") as llm:
            out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0)
            texts[q] = out["choices"][0]["text"]
    assert "Paris" in texts["f16"] and "Paris" in texts["q4_k_m"], texts
    assert texts["q4_k_m"].split()[0] == texts["f16"].split()[0], texts


def _logits(path, ids, lora=None):
    with gguf_check.open_llama(path, lora=lora) as llm:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)], dtype=np.float32)


def test_adapter_gguf_on_its_base_matches_the_merged_gguf(exported, embedded_run):
    folder, _ = exported
    out = folder.parent / "lora" / "adapter.gguf"
    report = export_mod.export(embedded_run, out=out, adapter_only=True, console=QUIET)
    assert report["files"][0]["check"]["passed"], report
    assert report["base_gguf"] == str(loading.embedded_gguf_path())  # the packaged base, not a copy
    r = gguf.GGUFReader(out)
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    assert _field(r, "adapter.lora.alpha") == pytest.approx(8.0)
    assert sum(t.name.endswith(".lora_a") for t in r.tensors) == 30 * 7  # every layer, all-linear (7 modules)
    assert f"ADAPTER ./{out.name}" in (out.parent / "Modelfile").read_text()

    tok = export_mod.resolve(embedded_run).tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "7 + 5 = 12. #### 12"}],
        tokenize=False,
    )
    ids = tok(text)["input_ids"]
    merged = _logits(folder / "m-f16.gguf", ids)
    applied = _logits(loading.embedded_gguf_path(), ids, lora=out)
    bare = _logits(loading.embedded_gguf_path(), ids)
    tol, agree = gguf_check.TOLERANCE["lora"]
    assert np.abs(applied - merged).max() < tol
    assert (applied.argmax(-1) == merged.argmax(-1)).mean() >= agree
    assert np.abs(applied - bare).max() > 1e-3  # the adapter does something in llama.cpp


@pytest.mark.slow
def test_exported_gguf_loads_back_as_a_base_and_trains(tmp_path, tiny_model_dir):
    """A q8_0 GGUF psft-lite wrote is a model psft-lite can train again (transformers dequantizes it on load)."""
    out = tmp_path / "gguf" / "m.gguf"
    export_mod.export(tiny_model_dir, out=out, quant="q8_0", console=QUIET)
    recipe = load_recipe(make_recipe(tmp_path, out, train={"max_steps": 2, "lr": 1e-3}))
    summary = trainer.run(recipe, console=QUIET)
    assert summary.steps == 2 and np.isfinite(summary.last["loss"])


def test_f32_export_of_the_base_reproduces_the_source_gguf_bit_exactly(tmp_path, embedded_dir):
    """Converter layout (names, q/k row permutation, shapes): our float32 GGUF of the dequantized embedded model holds
    exactly the source GGUF's weights, dequantized."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    source = loading.embedded_gguf_path()
    meta = gguf_convert.tokenizer_from_gguf(source, None)
    out = tmp_path / "base.gguf"
    f32 = gguf_convert.parse_quants("f32")[0]
    gguf_convert.write_model_gguf(out, dict(model.state_dict()), model.config, meta, f32, {"name": "t"})
    ours, theirs = gguf.GGUFReader(out), {t.name: t for t in gguf.GGUFReader(source).tensors}
    assert {t.name for t in ours.tensors} == set(theirs)
    for t in ours.tensors:
        s = theirs[t.name]
        want = gguf.quants.dequantize(s.data, s.tensor_type).reshape(-1)
        assert np.array_equal(np.asarray(t.data).reshape(-1), want), t.name


def _tiny(tmp_path, tokenizer, embedded_dir, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoConfig.from_pretrained(embedded_dir).to_dict()
    keep = {k: base[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "rms_norm_eps")}
    extra = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8} if model_type == "gemma3_text" else {}
    if model_type == "qwen3":
        extra = {"head_dim": 16}
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=model_type in ("qwen2", "gemma3_text"),
        **keep,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init, so a layout error shows in the logits
        for p in model.parameters():
            p.mul_(8.0 if p.ndim == 2 else 1.0)
    path = tmp_path / model_type
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "qwen3", "gemma3_text", "phi3"])
def test_other_families_export_and_check_in_llama_cpp(tmp_path, tokenizer, embedded_dir, model_type):
    """Qwen2 (q/k/v biases, no permutation), Mistral (llama layout, grouped kv heads), Qwen3 (q/k norms), Gemma 3
    (norms as offsets from 1, scaled embeddings, sliding-window layers: a window shorter than the check's texts) and
    Phi-3 (fused qkv and gate/up), from plain model folders with the tokenizer written from tokenizer.json: trained
    (LoRA on every linear layer, 2 steps), merged and exported, the export checked in llama.cpp."""
    path = _tiny(tmp_path, tokenizer, embedded_dir, model_type)
    recipe = make_recipe(tmp_path, path, train={"max_steps": 2, "lr": 1e-2, "batch_size": 2, "micro_batch_size": 2})
    run = trainer.run(load_recipe(recipe), console=QUIET)
    report = export_mod.export(run.run_dir, out=tmp_path / "out" / "m.gguf", quant="f32", console=QUIET)
    c = report["files"][0]["check"]
    assert c["passed"] and c["tokenizer_mismatches"] == 0 and c["max_abs_dlogit"] < 0.05, c
    r = gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    assert _field(r, "general.architecture") == gguf_convert.FAMILIES[model_type].arch
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    if model_type == "qwen2":
        assert "blk.0.attn_q.bias" in {t.name for t in r.tensors}


def test_a_converter_layout_error_fails_the_check_and_writes_nothing(tmp_path, tokenizer, embedded_dir, monkeypatch):
    path = _tiny(tmp_path, tokenizer, embedded_dir, "mistral")
    monkeypatch.setitem(gguf_convert.FAMILIES, "mistral", gguf_convert.Family("llama", permute_qk=False))
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(RunError, match="export check failed in llama.cpp") as e:
        export_mod.export(path, out=out, quant="f32", console=QUIET)
    assert "Nothing was written" in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_recipe_save_gguf_exports_at_the_end_of_training(tmp_path, tiny_model_dir):
    recipe = load_recipe(
        make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 2}, output={"save": "gguf", "gguf_quant": "f16"})
    )
    summary = trainer.run(recipe, console=QUIET)
    [path] = map(str, summary.gguf)
    assert path.endswith("run-f16.gguf")
    assert _field(gguf.GGUFReader(path), "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)


def _ollama_render(template: str, messages: list[dict[str, str]], default_system: str | None) -> str:
    """What Ollama's Template.Execute makes of our template: every system message (or, when there is none, the
    Modelfile's SYSTEM) joined into .System, and — as Ollama's collate does — still present in .Messages."""
    import re

    head, body, tail = re.fullmatch(
        r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}\{\{ range \.Messages \}\}(.*)\{\{ end \}\}\{\{ end \}\}(.*)",
        template,
        re.S,
    ).groups()
    branches = dict(
        (role, (pre, post))
        for role, pre, post in re.findall(
            r'(?:if|else if) eq \.Role "(\w+)" \}\}(.*?)\{\{ \.Content \}\}(.*?)\{\{ (?=else|end)',
            body + "{{ end }}",
            re.S,
        )
    )
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or default_system or ""
    out = head.replace("{{ .System }}", system) if system else ""
    for m in messages:
        if m["role"] in branches:
            pre, post = branches[m["role"]]
            out += pre + m["content"] + post
    return out + tail


def test_ollama_template_renders_the_prompt_the_run_trained_with(tokenizer):
    """The Modelfile's TEMPLATE, as Ollama fills it, gives the same prompt as the tokenizer's own chat template —
    with a system message (written once, not twice) and without one (the Modelfile's SYSTEM stands in for the
    template's default system prompt)."""
    fmt = ollama.chat_format(tokenizer)
    template = ollama.go_template(fmt)
    convs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
        ],
    ]
    for conv in convs:
        want = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert _ollama_render(template, conv, fmt.default_system) == want


def test_chat_format_reproduces_chatml_and_llama3_templates(tokenizer):
    tok = tokenizer
    fmt = ollama.chat_format(tok)
    assert fmt is not None and fmt.default_system.startswith("You are a helpful AI assistant")
    old = tok.chat_template
    try:
        tok.chat_template = (
            "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
            "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
        )
        llama3 = ollama.chat_format(tok)
        assert llama3 is not None and llama3.default_system is None
        assert llama3.user == ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
        assert "{{ .Content }}<|eot_id|>" in ollama.go_template(llama3)
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # roles invisible
        assert ollama.chat_format(tok) is None
    finally:
        tok.chat_template = old


@pytest.mark.slow
def test_bad_export_inputs_exit_2_with_nothing_written(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir, train={"max_steps": 1}))
    trainer.run(recipe, console=QUIET)
    run = tmp_path / "run"
    before = sorted(p.name for p in run.iterdir())

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    code, _, err = run_cli(capsys, "export", str(gpt2), "--out", str(tmp_path / "g.gguf"))
    assert code == 2 and "does not support the architecture 'gpt2'" in err and "Traceback" not in err

    code, _, err = run_cli(capsys, "export", str(run), "--quant", "q3_xs")
    assert code == 2 and "unknown type 'q3_xs'" in err

    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep")
    code, _, err = run_cli(capsys, "export", str(run), "--out", str(existing), "--quant", "f16")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert existing.read_bytes() == b"keep"

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "export", str(run), "--out", str(blocker / "m.gguf"), "--quant", "f16")
    assert code == 2 and "cannot write to" in err

    monkeypatch.setattr(extras, "installed", lambda module: module != "llama_cpp")
    code, _, err = run_cli(capsys, "export", str(run), "--quant", "q4_k_m", "--no-verify")
    assert code == 2 and "pip install 'psft-lite[gguf]'" in err and "q4_k_m" in err
    code, _, err = run_cli(capsys, "export", str(run), "--quant", "f16")
    assert code == 2 and "--no-verify" in err
    # without llama.cpp, the legacy types still export (unchecked)
    code, out, err = run_cli(capsys, "export", str(run), "--quant", "f16", "--no-verify")
    assert code == 0, err
    assert (run / "gguf" / "run-f16.gguf").is_file()
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, "gguf"])
    assert not (tmp_path / "g.gguf").exists() and not (blocker.is_dir())


def test_pre_tokenizer_is_named_from_what_tokenizer_json_says_it_does():
    from psft_lite.core.errors import ModelError

    def seq(*parts):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(parts)}}

    def split(regex):
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"}

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    assert gguf_convert.bpe_pre_tokenizer(seq(split(gguf_convert.LLAMA3_SPLIT), byte_level), "x") == "llama-bpe"
    assert gguf_convert.bpe_pre_tokenizer(seq(split(gguf_convert.QWEN2_SPLIT), byte_level), "x") == "qwen2"
    digits = {"type": "Digits", "individual_digits": True}
    assert gguf_convert.bpe_pre_tokenizer(seq(digits, {"type": "ByteLevel", "use_regex": True}), "x") == "smollm"
    with pytest.raises(ModelError, match="does not recognise this tokenizer's pre-tokenizer"):
        gguf_convert.bpe_pre_tokenizer(seq(split(r"\w+"), byte_level), "models/x")


def test_lora_gguf_refuses_what_a_llama_cpp_lora_cannot_carry(tmp_path):
    """DoRA, rank patterns and whole trained modules would be dropped silently; they are refused, nothing written."""
    from transformers import LlamaConfig

    from psft_lite.core.errors import ModelError

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    state = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 4),
    }
    base = {"r": 4, "lora_alpha": 8}
    cases = [
        ({**base, "use_dora": True}, state, "DoRA"),
        ({**base, "rank_pattern": {"q_proj": 8}}, state, "rank"),
        ({**base, "modules_to_save": ["lm_head"]}, state, "modules_to_save"),
        (base, {**state, "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(64, 16)}, "lm_head"),
    ]
    for i, (adapter_cfg, weights, word) in enumerate(cases):
        path = tmp_path / f"a{i}.gguf"
        with pytest.raises(ModelError, match=word):
            gguf_convert.write_lora_gguf(path, weights, adapter_cfg, cfg, {})
        assert not path.exists()
    n = gguf_convert.write_lora_gguf(tmp_path / "ok.gguf", state, base, cfg, {})
    assert n == 1 and len(gguf.GGUFReader(tmp_path / "ok.gguf").tensors) == 2


def test_llama3_rope_factors_match_transformers_own_scaling():
    """Llama 3.1's `rope_freqs` factors are what transformers divides the default inverse frequencies by."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
    )
    dim = cfg.hidden_size // cfg.num_attention_heads
    base = gguf_convert._rope_theta(cfg)
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    expected = (plain / scaled.double()).numpy()
    got = gguf_convert.llama3_rope_factors(cfg)
    assert got.shape == (dim // 2,) and got.min() == 1.0 and got.max() == 8.0  # both ends of the ramp are hit
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_an_output_format_names_its_functions_and_checks_before_training(monkeypatch):
    """The output table resolves "module:function" when called (it imports nothing above core); gguf's check says
    what is missing before any training when llama.cpp's binding is not installed."""
    from psft_lite.core import extras
    from psft_lite.core.errors import ModelError
    from psft_lite.core.lazy import resolve
    from psft_lite.exporting import outputs

    assert resolve(outputs.FORMATS["merged"].write) is merge_mod.write_merged
    assert resolve(outputs.FORMATS["gguf"].write) is export_mod.write_gguf
    monkeypatch.setattr(extras, "installed", lambda module: module != "llama_cpp")
    with pytest.raises(ModelError, match=r"recipe.toml: output.save = 'gguf' .*llama-cpp-python is not installed"):
        outputs.check(["adapter", "gguf"], "recipe.toml")
    outputs.check(["adapter", "merged"], "recipe.toml")  # nothing to check
