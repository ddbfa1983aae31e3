"""A torch-free tokenizer: `tokenizer.json`, the special tokens and the chat template of a checkpoint.

The gateway tokenizes every prompt and detokenizes every streamed token, but must start in well under a
second and stay small, so it cannot import transformers (which pulls in torch). This module reads the
same files transformers reads and reproduces what `AutoTokenizer` does with them for serving:

- `encode` / `decode` go straight to the `tokenizers` library, as transformers' fast tokenizers do.
  Tokens named in `tokenizer_config.json` that `tokenizer.json` lacks are added the way transformers
  adds them, so "special" (and thus skipped by `decode`) means the same on both sides.
- `apply_chat_template` renders the checkpoint's Jinja template in the same sandboxed environment
  transformers uses (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does
  not escape HTML, `strftime_now`, a `{% generation %}` tag), with the named special tokens as variables.

Tests compare every method with transformers on real checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
from tokenizers import AddedToken, Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
GENERATION_CONFIG = "generation_config.json"

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")  # fmt: skip


class ChatTemplateError(ValueError):
    """The chat template refused the messages (e.g. via `raise_exception`) or the model has none."""


class TextTokenizer:
    """Encode, decode and render chats exactly as the checkpoint's transformers tokenizer does."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        generation_eos_ids: Sequence[int] = (),
        generation_pad_id: int | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self._clean_up = clean_up_tokenization_spaces and type(tokenizer.model).__name__ != "BPE"
        eos = [*generation_eos_ids]
        if (tok_eos := self._optional_id("eos_token")) is not None:
            eos.append(tok_eos)
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos))
        pad = self._optional_id("pad_token")
        self.pad_token_id: int | None = pad if pad is not None else generation_pad_id
        self.bos_token_id: int | None = self._optional_id("bos_token")

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json`, the chat template and the generation config."""
        root = Path(path)
        tokenizer = Tokenizer.from_file(str(root / TOKENIZER_FILE))
        config = _read_json(root / TOKENIZER_CONFIG)
        special = {name: text for name in NAMED_SPECIAL_TOKENS if (text := _token_text(config.get(name)))}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):  # named extras ({"image_token": "<|image_pad|>"}) become variables
            special.update({name: text for name, value in extra.items() if (text := _token_text(value))})
            extra = list(extra.values())
        _add_missing_tokens(tokenizer, config.get("added_tokens_decoder") or {}, [*special.values(), *extra])
        generation = _read_json(root / GENERATION_CONFIG)
        eos = generation.get("eos_token_id")
        return cls(
            tokenizer,
            special_tokens=special,
            chat_template=_find_chat_template(root, config),
            generation_eos_ids=[eos] if isinstance(eos, int) else list(eos or []),
            generation_pad_id=generation.get("pad_token_id"),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    # -- vocabulary ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of one token string; KeyError when the vocabulary does not have it."""
        found = self._tokenizer.token_to_id(token)
        if found is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return found

    def _optional_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._tokenizer.token_to_id(token)

    # -- text <-> ids -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a BOS), as transformers."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; a byte-level token cut inside a UTF-8 character decodes to U+FFFD, as in transformers."""
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    # -- chat ---------------------------------------------------------------------------------------

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use the completions endpoint instead")
        return _sandbox().from_string(self.chat_template)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for `messages`, rendered as transformers' `apply_chat_template(tokenize=False)`.

        Keys whose value is None are dropped from each message first (OpenAI clients send
        `"content": null` next to tool calls), as transformers does.
        """
        if not messages:
            raise ChatTemplateError("cannot render an empty conversation")
        chat = [{k: _plain(v) for k, v in message.items() if v is not None} for message in messages]
        variables = {**self.special_tokens, **{k: _plain(v) for k, v in kwargs.items()}}
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None

    def render_chat_ids(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat (no special tokens added beyond those the template writes)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as saved: a string, or an AddedToken dict `{"content": ..., ...}`."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _add_missing_tokens(tokenizer: Tokenizer, decoder: Mapping[str, Any], special: list[Any]) -> None:
    """Add tokens named in the config that `tokenizer.json` does not list as added tokens.

    transformers does the same on load: `added_tokens_decoder` entries keep their flags, named and
    extra special tokens become special. Checkpoints written by transformers already list them all in
    `tokenizer.json`, so this usually adds nothing.
    """
    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    new: list[AddedToken] = []
    for _, entry in sorted(decoder.items(), key=lambda item: int(item[0])):
        if isinstance(entry, Mapping) and entry.get("content") not in present:
            flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
            new.append(AddedToken(entry["content"], **{f: bool(entry[f]) for f in flags if f in entry}))
            present.add(entry["content"])
    for value in special:
        text = _token_text(value)
        if text and text not in present:
            new.append(AddedToken(text, special=True, normalized=False))
            present.add(text)
    if new:
        tokenizer.add_tokens(new)


def _find_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    """`chat_template.jinja`, else the tokenizer config's template (its "default" if named), else
    the processor's `chat_template.json`: the order transformers looks in."""
    if (root / CHAT_TEMPLATE_FILE).is_file():
        return (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    template = _read_json(root / CHAT_TEMPLATE_JSON).get("chat_template")
    return template if isinstance(template, str) else None


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types, so the sandboxed template never sees a rich object's methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied only to non-BPE tokenizers that ask for it)."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text


# -- the Jinja environment -------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it; rendering
    the body unchanged is all serving needs, and templates that use it would not compile without it."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace` refusing underscore attributes, so a template cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _sandbox() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """A fresh environment per tokenizer: templates come with checkpoints and are untrusted code."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env
