"""The toy GLM-style tokenizer, and loading any local Hugging Face tokenizer directory.

`build_toy_tokenizer` trains a real byte-level BPE with the `tokenizers` library over a text
corpus (the toy tasks' text: `envs.tasks.tokenizer_corpus()`, passed in by the caller since
`models` may not import `envs`) plus the chat template's own text, and saves a directory that
`transformers.AutoTokenizer.from_pretrained` loads, chat template included.

Properties (the ones GLM has and the toy runs rely on):
  * every digit is its own token (digits are split before BPE), which makes arithmetic learnable;
  * byte-level BPE without normalisation, so any text round-trips exactly;
  * GLM-4 special tokens are single ids: control tokens (`[gMASK]`, `<sop>`, role tokens,
    `<|endoftext|>` = eos = pad) are special; the tool-call tags are added but *not* special,
    as in GLM-4.5, so `decode(..., skip_special_tokens=True)` keeps tool calls parseable.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN
CONTROL_TOKENS = (
    EOS_TOKEN,
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
)
TOOL_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
    "<tool_response>",
    "</tool_response>",
)
GLM_SPECIAL_TOKENS = CONTROL_TOKENS + TOOL_TOKENS
STOP_TOKENS = (EOS_TOKEN, "<|user|>", "<|observation|>")  # GLM-4.5 generation_config eos list
CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
_BYTE_ALPHABET = 256
MAX_TOY_VOCAB = 65_536
TEMPLATE_SAMPLE_SHARE = 10  # one template rendering per this many corpus lines


class TokenizerLoadError(ValueError):
    """A tokenizer directory is missing or cannot be loaded; the message names the path."""


def chat_template() -> str:
    """The text of Physarum's GLM-style chat template (models/chat_template.jinja)."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def _template_text() -> str:
    """One rendering of every template construct (tools header, all roles, a tool call)."""
    tool = {"name": "f", "description": "", "parameters": {"type": "object", "properties": {}}}
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {
            "role": "assistant",
            "content": "a",
            "tool_calls": [{"function": {"name": "f", "arguments": {"k": "v"}}}],
        },
        {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "a"},
    ]
    rendered, _ = render_jinja_template(
        conversations=[messages], tools=[tool], chat_template=chat_template()
    )
    return rendered[0]


def _train(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return tokenizer


def build_toy_tokenizer(
    out_dir: str | Path, corpus: Iterable[str], *, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train the toy GLM-style tokenizer on `corpus` and save it to `out_dir`.

    corpus      lines of text, e.g. `envs.tasks.tokenizer_corpus(seed=0)`; the chat template's
                own text (role markers, the tools header) is added to it
    vocab_size  total ids including the 15 GLM special tokens; 256 byte tokens are always in

    Deterministic: the same corpus and vocab_size give byte-identical files. Returns the
    loaded tokenizer (chat template set, eos = pad = `<|endoftext|>`).
    """
    minimum = _BYTE_ALPHABET + len(GLM_SPECIAL_TOKENS)
    if not minimum < vocab_size <= MAX_TOY_VOCAB:
        raise ValueError(
            f"vocab_size: expected {minimum} < vocab_size <= {MAX_TOY_VOCAB}, got {vocab_size}"
        )
    texts = [line for line in corpus if line]
    if not texts:
        raise ValueError("corpus: expected at least one non-empty line of text")
    texts += [_template_text()] * max(1, len(texts) // TEMPLATE_SAMPLE_SHARE)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    backend = _train(texts, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(CONTROL_TOKENS[1:]),
        chat_template=chat_template(),
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _write_portable_config(out_dir)
    log.info("toy tokenizer: %d ids from %d lines -> %s", len(tokenizer), len(texts), out_dir)
    return load_tokenizer(out_dir)


def _write_portable_config(out_dir: Path) -> None:
    """Name the generic fast-tokenizer class (loads in transformers 4 and 5) and write the
    legacy special_tokens_map.json next to tokenizer_config.json."""
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    special = {
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(CONTROL_TOKENS[1:]),
    }
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2) + "\n", encoding="utf-8"
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Any local Hugging Face tokenizer directory (ours or a real GLM one), via AutoTokenizer.

    Raises TokenizerLoadError naming the path when it is missing, has no tokenizer files or
    fails to load.
    """
    path = Path(path)
    if not path.is_dir():
        raise TokenizerLoadError(f"tokenizer path {str(path)!r} is not a directory")
    known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / name).is_file() for name in known):
        raise TokenizerLoadError(
            f"tokenizer path {str(path)!r} has none of {list(known)}; is it a tokenizer directory?"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many types; name the path in one error
        raise TokenizerLoadError(f"tokenizer path {str(path)!r} failed to load: {err}") from err


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a model turn: `<|endoftext|>`, `<|user|>`, `<|observation|>` (GLM).

    For a tokenizer without GLM role tokens this is its eos id. ValueError when there is none.
    """
    ids = []
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)  # unk id (or None) when absent
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: no eos or GLM stop token found")
    return ids
