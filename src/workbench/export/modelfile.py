"""Ollama Modelfiles next to the exported GGUFs.

One ``<stem>.Modelfile`` per shipped GGUF: ``FROM ./model-q8_0.gguf`` for a merged
file; ``FROM ./base-f16.gguf`` + ``ADAPTER ./adapter-f16.gguf`` for the LoRA adapter.
Each carries:

* ``TEMPLATE``: the tokenizer's chat template translated into Ollama's Go-template
  syntax. The translation covers "one wrapper per message" templates (ChatML, the
  built-in tokenizer's newline-separated ChatML, Llama 3, ...): it renders the Jinja
  template on marker conversations, reads off what comes before the first message,
  between messages around the role name, and after the last user message (the
  generation prompt), and writes a Go template of that shape. It is then *checked*:
  rendered with :mod:`workbench.export.gotemplate` on the run's held-out chat rows
  (as generation prompts, and with the reply as a final assistant message that
  Ollama continues) plus conversations with a system turn and several turns, it must
  give exactly the text of transformers' ``apply_chat_template``. A template that
  cannot be translated this way (a role renamed, e.g. Gemma's "model"; a system
  turn folded into the first user turn; a default system prompt) is left out, and
  the Modelfile says why in a comment: Ollama then falls back to the GGUF's own
  ``tokenizer.chat_template`` matching, which may be wrong, so users are told to
  write one.
* ``PARAMETER stop`` for the end-of-turn tokens: the EOS and every special token
  the template writes between turns.
* the decoding the run's evaluation used (greedy: ``temperature 0``; ``num_predict``
  = the run's ``eval.max_new_tokens``) and ``num_ctx`` = the trained context, so
  ``ollama run`` behaves like what was measured.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import gotemplate

#: Message contents used to find the template's structure: plain letters, so that
#: templates which trim or escape contents keep them intact.
_MARKERS = ("wbmarkeruserone", "wbmarkerassistantone", "wbmarkerusertwo")

#: Ollama's template, for a wrapper template; {head}/{between}/{tail}/{gen} are Go-template-safe text.
_SHAPE = ('{{{{- range $i, $_ := .Messages }}}}\n'
          '{{{{- $last := eq (len (slice $.Messages $i)) 1 }}}}\n'
          '{{{{- if $i }}}}{between}{{{{ else }}}}{head}{{{{ end }}}}{{{{ .Role }}}}{tail}{{{{ .Content }}}}\n'
          '{{{{- if and $last (ne .Role "assistant") }}}}{gen}{{{{ end }}}}\n'
          '{{{{- end }}}}')


@dataclass
class Translation:
    template: str | None          # the Go template, or None when it could not be translated
    note: str                     # what was checked, or why it was left out
    stops: list[str] = field(default_factory=list)
    checked: int = 0              # conversations compared with transformers


def hf_text(tok, messages: list[dict], strip_bos: bool = False) -> str:
    """What transformers renders for a conversation as Ollama would be asked to
    continue it: a generation prompt after a user turn, the final assistant turn left
    open (``continue_final_message``) otherwise."""
    last_assistant = messages[-1]["role"] == "assistant"
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=not last_assistant,
                                   continue_final_message=last_assistant)
    if strip_bos and tok.bos_token and text.startswith(tok.bos_token):
        text = text[len(tok.bos_token):]
    return text


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's view of a conversation: the system messages joined, and the messages
    with consecutive turns of one role merged (``template.collate`` in Ollama)."""
    system, out = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if out and out[-1]["Role"] == m["role"]:
            out[-1]["Content"] += "\n\n" + m["content"]
        else:
            out.append({"Role": m["role"], "Content": m["content"]})
    return "\n\n".join(system), out


def ollama_text(template: str, messages: list[dict]) -> str:
    """``template`` rendered the way Ollama renders a Messages template."""
    system, collated = collate(messages)
    return gotemplate.render(template, {"System": system, "Messages": collated, "Tools": None, "Response": "",
                                        "Think": False, "IsThinkSet": False})


def conversations(rows: list[dict]) -> list[list[dict]]:
    """The conversations a translation is checked on: every held-out chat row as a
    generation prompt and with its reply (continued), plus a system turn and several turns."""
    convs = []
    for r in rows:
        prompt, completion = r.get("prompt"), r.get("completion")
        if isinstance(prompt, list) and prompt:
            convs.append(list(prompt))
            if isinstance(completion, list) and completion:
                convs.append(list(prompt) + list(completion))
        elif isinstance(r.get("messages"), list) and r["messages"]:
            convs.append(list(r["messages"]))
    sys_ = {"role": "system", "content": "You are terse."}
    u1, a1 = {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}
    u2 = {"role": "user", "content": "And  4 plus 4?\n"}
    convs += [[sys_, u1], [u1, a1, u2], [sys_, u1, a1, u2], [sys_, u1, a1]]
    return convs


def _escape_go_text(text: str) -> str | None:
    """Literal template text as Go-template text (None when it cannot be written as such)."""
    return None if "{{" in text or "}}" in text or '"""' in text else text


def translate(tok, rows: list[dict], add_bos: bool = False) -> Translation:
    """The tokenizer's chat template in Ollama's syntax, checked on ``rows``' conversations."""
    if not getattr(tok, "chat_template", None):
        return Translation(None, "the tokenizer has no chat template, so there is none to translate")
    strip_bos = bool(add_bos and tok.bos_token)
    u1, a1, u2 = ({"role": r, "content": c} for r, c in zip(("user", "assistant", "user"), _MARKERS))
    try:
        text = hf_text(tok, [u1, a1, u2], strip_bos)
    except Exception as err:   # a Jinja template raises what it likes (e.g. raise_exception)
        return Translation(None, f"the chat template does not render a user/assistant/user conversation ({err})")
    pieces, rest = [], text
    for marker in _MARKERS:
        before, found, rest = rest.partition(marker)
        if not found or marker in rest:
            return Translation(None, "the chat template does not write each message's content once, as it is "
                               "(it changes or repeats it)")
        pieces.append(before)
    pieces.append(rest)
    first, second, third, gen = pieces
    structure = _wrapper(first, second, third)
    if structure is None:
        return Translation(None, "the chat template is not one wrapper per message around the role name (e.g. it "
                           "renames roles or folds the system turn into a user turn); Ollama's syntax would need a "
                           "hand-written translation")
    head, between, tail = structure
    parts = [_escape_go_text(p) for p in (head, between, tail, gen)]
    if any(p is None for p in parts):
        return Translation(None, "the chat template writes '{{', '}}' or '\"\"\"', which a Modelfile TEMPLATE "
                           "cannot hold as plain text")
    template = _SHAPE.format(head=parts[0], between=parts[1], tail=parts[2], gen=parts[3])
    convs = conversations(rows)
    for conv in convs:
        try:
            want = hf_text(tok, conv, strip_bos)
        except Exception as err:
            return Translation(None, f"the chat template refuses a conversation Ollama can send ({err})")
        got = ollama_text(template, conv)
        if got != want:
            return Translation(None, "the translated template renders differently from the chat template for "
                               f"{[m['role'] for m in conv]} ({got[:80]!r} vs {want[:80]!r})")
    specials = [s for s in tok.all_special_tokens if s and s != tok.bos_token and s != tok.pad_token]
    literal = head + between + tail + gen
    stops = [tok.eos_token] if tok.eos_token else []
    stops += [s for s in specials if s in literal and s not in stops]
    return Translation(template, f"translated from the tokenizer's chat template and checked: it renders exactly "
                       f"the text of transformers' apply_chat_template for {len(convs)} conversations (the "
                       "held-out chat rows, a system turn, several turns)", stops, len(convs))


def _wrapper(first: str, second: str, third: str) -> tuple[str, str, str] | None:
    """(head, between, tail) with first = head + "user" + tail, second = between +
    "assistant" + tail, third = between + "user" + tail; None when the text has no such shape."""
    for n in range(min(len(first), len(second), len(third)), -1, -1):
        tail = third[len(third) - n:] if n else ""
        if not (first.endswith(tail) and second.endswith(tail)):
            continue
        f, s, t = first[:len(first) - n], second[:len(second) - n], third[:len(third) - n]
        if f.endswith("user") and s.endswith("assistant") and t.endswith("user"):
            between = t[:-len("user")]
            if s[:-len("assistant")] == between:
                return f[:-len("user")], between, tail
    return None


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(gguf_name: str, translation: Translation, *, adapter: str | None = None, num_ctx: int | None = None,
           max_new_tokens: int | None = None, what: str = "", notes: tuple[str, ...] = ()) -> str:
    """The Modelfile's text. ``gguf_name``: the FROM file (the base GGUF with ``adapter``)."""
    lines = [f"# Ollama Modelfile for {adapter or gguf_name}{what}, written by `workbench export`.",
             f"# Use: ollama create NAME -f {Path(adapter or gguf_name).stem}.Modelfile && ollama run NAME",
             f"FROM ./{gguf_name}"]
    if adapter:
        lines += ["# The LoRA adapter, applied to the base GGUF above at load time (llama.cpp's GGUF LoRA format).",
                  f"ADAPTER ./{adapter}"]
    lines += [f"# {n}" for n in notes]
    if translation.template is not None:
        lines += [f"# TEMPLATE: {translation.note}.", f'TEMPLATE """{translation.template}"""']
    else:
        lines += [f"# No TEMPLATE: {translation.note}. Write one by hand (Ollama's Go-template syntax) before "
                  "chatting; without it Ollama guesses from the GGUF's tokenizer.chat_template."]
    lines += [f"PARAMETER stop {_quote(s)}" for s in translation.stops]
    if max_new_tokens:
        lines += [f"# The run's evaluation decoded greedily, at most {max_new_tokens} new tokens "
                  "(config.yaml eval.max_new_tokens):",
                  "PARAMETER temperature 0", f"PARAMETER num_predict {max_new_tokens}"]
    if num_ctx:
        lines += [f"# The model's trained context (max_position_embeddings): {num_ctx} tokens.",
                  f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"


def parse_template(text: str) -> str | None:
    """The TEMPLATE of a Modelfile's text (None if it has none)."""
    start = text.find('TEMPLATE """')
    if start < 0:
        return None
    body = text[start + len('TEMPLATE """'):]
    return body[:body.index('"""')]


def parse(text: str) -> dict:
    """{"FROM": str, "ADAPTER": str | None, "TEMPLATE": str | None, "PARAMETER": [(key, value)]}."""
    import shlex

    out = {"FROM": None, "ADAPTER": None, "TEMPLATE": parse_template(text), "PARAMETER": []}
    rest = text
    if out["TEMPLATE"] is not None:
        before, _, after = text.partition('TEMPLATE """')
        rest = before + after[after.index('"""') + 3:]
    for line in rest.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        word, _, rest = line.strip().partition(" ")
        if word in ("FROM", "ADAPTER"):
            out[word] = rest
        elif word == "PARAMETER":
            key, _, value = rest.partition(" ")
            out["PARAMETER"].append((key, shlex.split(value)[0] if value.startswith('"') else value))
    return out
