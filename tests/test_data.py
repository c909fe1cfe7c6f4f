"""Data: every format becomes messages; masks train each assistant token incl. end-of-turn and no prompt token."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from psft_lite.core.errors import DataError
from psft_lite.data import load_conversations, load_examples
from psft_lite.data.batching import DataPlan, collate
from psft_lite.recipe.schema import DataSection

from conftest import write_jsonl

Q, A = "What is 7 + 5?", "7 + 5 = 12.\n#### 12"
ROWS = {
    "prompt_completion": {"prompt": Q, "completion": A},
    "messages": {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
    "alpaca": {"instruction": Q, "input": "", "output": A},
    "sharegpt": {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
}


def _trained_text(tokenizer, ex):
    return tokenizer.decode(ex.ids[ex.mask].tolist())


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("declared", [True, False])
def test_each_format_trains_exactly_the_response_and_end_of_turn(tmp_path, tokenizer, fmt, declared):
    f = write_jsonl(tmp_path / "d.jsonl", [ROWS[fmt]])
    data = DataSection(train=str(f), format=fmt if declared else "auto")
    (ex,), stats = load_examples(data.train[0], data, tokenizer)
    assert _trained_text(tokenizer, ex) == A + tokenizer.eos_token  # <|im_end|> is trained although pad == eos
    assert ex.ids[ex.mask][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_text = tokenizer.decode(ex.ids[~ex.mask].tolist())
    assert Q in prompt_text and "12" not in prompt_text.replace(Q, "")
    # the untrained part is exactly what generation starts from
    gen_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": Q}], tokenize=False, add_generation_prompt=True
    )
    first_trained = int(ex.mask.argmax())
    assert tokenizer.decode(ex.ids[:first_trained].tolist()) == gen_prompt
    assert stats.trained_tokens == ex.n_trained


def test_multi_turn_trains_every_assistant_turn_only(tmp_path, tokenizer):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "#### 4"},
    ]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv}])
    data = DataSection(train=str(f))
    (ex,), _ = load_examples(data.train[0], data, tokenizer)
    eot = tokenizer.eos_token
    assert _trained_text(tokenizer, ex) == f"Hello!{eot}#### 4{eot}"
    assert "Be brief." not in _trained_text(tokenizer, ex)


def test_field_mapping_and_system_prompt(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": Q, "answer": A}])
    data = DataSection(train=str(f), fields={"prompt": "question", "completion": "answer"}, system_prompt="You add.")
    ((msgs, row),) = load_conversations(data.train[0], data)
    assert msgs[0] == {"role": "system", "content": "You add."} and msgs[-1]["content"] == A
    assert row.where.endswith("d.jsonl:1") and row.data["question"] == Q


def test_json_parquet_csv_and_dataset_folder_read_the_same(tmp_path, tokenizer):
    rows = [{"prompt": Q, "completion": A}, {"prompt": "1+1?", "completion": "#### 2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text('prompt,completion\n"What is 7 + 5?","7 + 5 = 12.\n#### 12"\n1+1?,#### 2\n')
    # a folder laid out like a hub data set repo: the hub code path (datasets.load_dataset) on local files
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    seen = []
    for name in ("d.json", "d.parquet", "d.csv", "hub"):
        data = DataSection(train=str(tmp_path / name))
        convs = load_conversations(data.train[0], data)
        seen.append([m for m, _ in convs])
    assert all(s == seen[0] for s in seen)


def _err(tmp_path, tokenizer, content, name="d.jsonl", **kw) -> str:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    data = DataSection(train=str(p), **kw)
    with pytest.raises(DataError) as e:
        load_examples(data.train[0], data, tokenizer)
    return str(e.value)


def test_bad_data_errors_name_file_and_line(tmp_path, tokenizer):
    ok = json.dumps({"prompt": Q, "completion": A})
    msg = _err(tmp_path, tokenizer, ok + "\n" + json.dumps({"prompt": Q}) + "\n")
    assert "d.jsonl:2" in msg and "'completion'" in msg and "data.fields.completion" in msg
    msg = _err(tmp_path, tokenizer, ok + "\n" + '{"prompt": "x", "compl')
    assert "d.jsonl:2" in msg and "not valid JSON" in msg
    assert "empty" in _err(tmp_path, tokenizer, "")
    assert "not UTF-8" in _err(tmp_path, tokenizer, b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    assert "cannot tell the data format" in _err(tmp_path, tokenizer, json.dumps({"text": "hi"}) + "\n")
    assert "one file must use one format" in _err(tmp_path, tokenizer, ok + "\n" + json.dumps(ROWS["messages"]) + "\n")
    msg = _err(tmp_path, tokenizer, json.dumps({"prompt": Q, "completion": ""}) + "\n")
    assert "no non-empty assistant response" in msg
    msg = _err(tmp_path, tokenizer, ok + "\n", max_length=10)
    assert "data.max_length = 10" in msg
    msg = _err(tmp_path, tokenizer, ok + "\n", max_length=10, truncation="error")
    assert "d.jsonl:1" in msg and "longer than data.max_length" in msg


def test_missing_file_suggests_a_near_name(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    data = DataSection(train=str(tmp_path / "trian.jsonl"))
    with pytest.raises(DataError, match="Did you mean .*train.jsonl"):
        load_conversations(data.train[0], data)


def test_truncate_and_drop_policies(tmp_path, tokenizer):
    long = {"prompt": "Count.", "completion": " ".join(["one"] * 200)}
    f = write_jsonl(tmp_path / "d.jsonl", [long, {"prompt": Q, "completion": A}])
    data = DataSection(train=str(f), max_length=64, truncation="drop")
    ex, stats = load_examples(data.train[0], data, tokenizer)
    assert len(ex) == 1 and stats.dropped_too_long == 1
    data = DataSection(train=str(f), max_length=64, truncation="truncate")
    ex, stats = load_examples(data.train[0], data, tokenizer)
    assert len(ex) == 2 and stats.truncated == 1 and max(len(e) for e in ex) == 64


def test_plan_is_a_pure_function_of_step_and_covers_each_epoch():
    plan = DataPlan(n_examples=10, batch_size=4, micro_batch_size=2, seed=3)
    assert plan.steps_per_epoch == 3
    epoch0 = sum((plan.step_indices(s) for s in range(3)), [])
    assert sorted(epoch0) == list(range(10))
    again = DataPlan(n_examples=10, batch_size=4, micro_batch_size=2, seed=3)
    assert [again.step_indices(s) for s in range(6)] == [plan.step_indices(s) for s in range(6)]
    assert plan.step_indices(3) != plan.step_indices(0) or plan.step_indices(4) != plan.step_indices(1)
    lengths = list(range(10))
    mbs = plan.micro_batches(0, lengths)
    assert [len(m) for m in mbs] == [2, 2] and lengths[mbs[0][-1]] <= lengths[mbs[1][0]]


def test_collate_pads_right_and_masks(tokenizer, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": Q, "completion": A}, {"prompt": "1+1?", "completion": "#### 2"}])
    data = DataSection(train=str(f))
    ex, _ = load_examples(data.train[0], data, tokenizer)
    b = collate(ex, [0, 1], tokenizer.pad_token_id)
    assert b.input_ids.shape == (2, max(len(e) for e in ex))
    assert b.n_trained == sum(e.n_trained for e in ex) and b.n_tokens == sum(len(e) for e in ex)
    short = int(b.attention_mask.sum(-1).argmin())
    assert not b.target_mask[short, b.attention_mask[short] == 0].any()


def test_gsm8k_rows_drop_calculator_annotations_and_keep_the_answer(tmp_path):
    """The study's natural-language targets: worked solutions without `<<a*b=c>>`, still ending in `#### N`."""
    from psft_lite.data import gsm8k

    src = tmp_path / "test.jsonl"
    src.write_text(
        json.dumps(
            {"question": " Tom has 3 bags of 4 apples. How many? ", "answer": "3*4=<<3*4=12>>12 apples.\n#### 12"}
        )
        + "\n\n",
        encoding="utf-8",
    )
    (row,) = gsm8k.rows(src)
    assert row == {"prompt": "Tom has 3 bags of 4 apples. How many?", "completion": "3*4=12 apples.\n#### 12"}
