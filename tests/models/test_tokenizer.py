"""The toy GLM-style tokenizer: exact round trips, single-id specials and digits, HF loading."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from envs.tasks import TASKS, make_rows, tokenizer_corpus
from models.chat import render_sft
from models.tokenizer import (
    CONTROL_TOKENS,
    GLM_SPECIAL_TOKENS,
    TOOL_TOKENS,
    TokenizerLoadError,
    build_toy_tokenizer,
    load_tokenizer,
    stop_token_ids,
)

CORPUS_ROWS = 300


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy_tokenizer")
    build_toy_tokenizer(out, tokenizer_corpus(n_per_task=CORPUS_ROWS, seed=0))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return load_tokenizer(tok_dir)


def _texts(task: str, tok) -> list[str]:
    """Each message of 300 demonstrations, and each whole conversation as the template renders."""
    texts = []
    for row in make_rows(task, 300, seed=11, split="test"):
        demo = TASKS[task].demonstration(row)
        texts += [m["content"] for m in demo if m.get("content")]
        texts.append(tok.apply_chat_template(demo, tools=row.get("tools"), tokenize=False))
    return texts


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_toy_row_round_trips_exactly(tok, task: str) -> None:
    for text in _texts(task, tok):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_arbitrary_text_round_trips(tok) -> None:
    samples = [
        "北京 weather ☀️",
        "tab\there\r\nCRLF",
        "  leading and trailing  ",
        "\x00\x7f",
        "ß∂ƒ©",
    ]
    samples.append("<|user|> inside <tool_call>text</tool_call> <think>x</think>")
    for text in samples:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_digits_are_single_tokens(tok) -> None:
    for token in tok.get_vocab():
        text = tok.convert_tokens_to_string([token])
        if any(ch.isdigit() for ch in text):
            assert len(text) == 1, f"token {token!r} merges a digit: {text!r}"
    ids = tok.encode("1234567890 x12", add_special_tokens=False)
    assert [tok.decode([i]) for i in ids][:10] == list("1234567890")


def test_glm_special_tokens_are_single_distinct_ids(tok) -> None:
    ids = []
    for token in GLM_SPECIAL_TOKENS:
        (token_id,) = tok.encode(token, add_special_tokens=False)
        assert tok.convert_ids_to_tokens(token_id) == token
        ids.append(token_id)
    assert len(set(ids)) == len(GLM_SPECIAL_TOKENS) == 15
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id


def test_control_tokens_are_special_but_tool_tags_are_not(tok) -> None:
    text = "<|user|>\nq<|assistant|>\n<tool_call>f\n</tool_call><|observation|><|endoftext|>"
    kept = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert kept == "\nq\n<tool_call>f\n</tool_call>"
    assert set(CONTROL_TOKENS) <= set(tok.all_special_tokens)
    assert not set(TOOL_TOKENS) & set(tok.all_special_tokens)


def test_vocab_is_small(tok) -> None:
    assert 300 < len(tok) <= 512


def test_stop_tokens_are_glm_eos_list(tok) -> None:
    expected = [
        tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")
    ]
    assert stop_token_ids(tok) == expected


def test_auto_tokenizer_loads_the_directory(tok_dir: Path, tok) -> None:
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in tok_dir.iterdir()
    }
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config["chat_template"]
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    assert isinstance(auto, PreTrainedTokenizerFast)
    text = "[gMASK]<sop><|user|>\n37+58=<|assistant|>\n95<|endoftext|>"
    assert auto.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "37+58="}]
    rendered = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "[gMASK]<sop><|user|>\n37+58=<|assistant|>"


def test_toy_prompts_are_short(tok) -> None:
    row = make_rows("arithmetic", 1)[0]
    ids = tok.apply_chat_template(row["messages"], add_generation_prompt=True, return_dict=False)
    assert len(ids) == 2 + 2 + 6 + 1  # [gMASK]<sop> <|user|>\n  d d + d d =  <|assistant|>
    row = make_rows("calculator", 1)[0]
    prompt, response, _ = render_sft(tok, TASKS["calculator"].demonstration(row), row["tools"])
    assert len(prompt) < 160 and len(prompt) + len(response) < 256  # toy_agentic max_context


def test_build_is_deterministic_across_processes(tok_dir: Path, tmp_path: Path) -> None:
    # a fresh interpreter: the Rust trainer's hash maps get new random seeds
    code = (
        "import sys; from envs.tasks import tokenizer_corpus; "
        "from models.tokenizer import build_toy_tokenizer; "
        f"build_toy_tokenizer(sys.argv[1], tokenizer_corpus(n_per_task={CORPUS_ROWS}, seed=0))"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tok_dir / name).read_bytes(), name


def test_build_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_toy_tokenizer(tmp_path, ["12+3="], vocab_size=100)
    with pytest.raises(ValueError, match="corpus"):
        build_toy_tokenizer(tmp_path, ["", ""])


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="missing_dir"):
        load_tokenizer(tmp_path / "missing_dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerLoadError, match="empty.*tokenizer directory"):
        load_tokenizer(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="broken.*failed to load"):
        load_tokenizer(broken)


def test_any_local_hf_tokenizer_loads_the_same_way(tmp_path: Path) -> None:
    vocab = {"<eos>": 0, "<unk>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    other.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode("hello world", add_special_tokens=False) == [2, 3]
    assert stop_token_ids(loaded) == [0]
