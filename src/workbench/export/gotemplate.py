"""A small renderer for the subset of Go's text/template that our Ollama TEMPLATEs use.

Ollama renders a Modelfile's TEMPLATE with Go's ``text/template``. We cannot run Go
here, so the export checks each template it writes by rendering it with this module
and comparing the text with the tokenizer's own chat template (transformers'
``apply_chat_template``). Supported, with Go's semantics:

* text and actions ``{{ ... }}``, with the trim markers ``{{- `` and `` -}}`` (all
  whitespace before / after the action is dropped) and comments ``{{/* ... */}}``;
* ``{{ if P }}``, ``{{ else if P }}``, ``{{ else }}``, ``{{ end }}``;
* ``{{ range P }}``, ``{{ range $e := P }}``, ``{{ range $i, $e := P }}`` (dot is the
  element), with ``{{ else }}`` for an empty list;
* variables: ``$`` (the data), ``{{ $x := P }}`` (declared until the enclosing
  ``end``), ``{{ $x = P }}`` (assigned);
* operands: ``.``, ``.Field.Field``, ``$x.Field``, ``"strings"`` (Go escapes),
  integers, ``true``/``false``/``nil``, ``( ... )``, and pipes ``a | f b``;
* functions ``eq ne lt le gt ge and or not len index slice print``.

Anything else raises :class:`TemplateError`, so a template using more than this
cannot pass the export's check by accident.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


class TemplateError(ValueError):
    """The template uses syntax outside the supported subset, or fails to render."""


# --------------------------------------------------------------------------- lexing
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _split(source: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", body)] with the trim markers applied to the text."""
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = source[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    parts.append(("text", source[pos:]))
    if "{{" in "".join(t for k, t in parts if k == "text"):
        raise TemplateError("an unterminated '{{' in the template")
    return [(k, t) for k, t in parts if k == "action" or t]


_TOKEN = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)|
    (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)|
    (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)|
    (?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>:=|=|\(|\)|\||,))""", re.X)


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise TemplateError(f"cannot read {text[pos:pos + 20]!r} in {{{{ {text} }}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "'": "'"}


def _unquote(s: str) -> str:
    body = s[1:-1]
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise TemplateError(f"unsupported escape \\{nxt} in {s}")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------- parsing
@dataclass
class _If:
    branches: list = field(default_factory=list)   # [(pipeline tokens, nodes)]
    otherwise: list = field(default_factory=list)


@dataclass
class _Range:
    names: list
    pipe: list
    body: list = field(default_factory=list)
    otherwise: list = field(default_factory=list)


def parse(source: str) -> list:
    """The template as nodes: str (text), ("print", tokens), ("set", names, op, tokens), _If, _Range."""
    nodes, _ = _parse_block(_split(source), 0, top=True)
    return nodes


def _parse_block(parts, i, top=False):
    """Nodes until an {{ end }} / {{ else ... }} (returned as the stopper) or the end."""
    nodes = []
    while i < len(parts):
        kind, body = parts[i]
        i += 1
        if kind == "text":
            nodes.append(body)
            continue
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise TemplateError(f"an unterminated comment {{{{{body}}}}}")
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in ("end", "else"):
            if top:
                raise TemplateError(f"{{{{ {body} }}}} without an open if/range")
            return nodes, (i, body)
        if word == "if":
            node, i = _parse_if(parts, i, body[2:].strip())
            nodes.append(node)
        elif word == "range":
            node, i = _parse_range(parts, i, body[5:].strip())
            nodes.append(node)
        elif word in ("with", "define", "template", "block", "break", "continue"):
            raise TemplateError(f"{{{{ {word} }}}} is outside the supported subset")
        else:
            toks = _tokens(body)
            if len(toks) >= 2 and toks[0][0] == "var" and toks[1] in (("op", ":="), ("op", "=")):
                nodes.append(("set", [toks[0][1]], toks[1][1], toks[2:]))
            else:
                nodes.append(("print", toks))
    if not top:
        raise TemplateError("an if/range without its {{ end }}")
    return nodes, None


def _parse_if(parts, i, cond):
    node = _If()
    while True:
        body, stop = _parse_block(parts, i)
        node.branches.append((_tokens(cond), body))
        i, word = stop
        if word == "end":
            return node, i
        rest = word[4:].strip()
        if rest.startswith("if"):
            cond = rest[2:].strip()
            continue
        if rest:
            raise TemplateError(f"{{{{ {word} }}}} is outside the supported subset")
        node.otherwise, stop = _parse_block(parts, i)
        i, word = stop
        if word != "end":
            raise TemplateError(f"{{{{ {word} }}}} after an {{{{ else }}}}")
        return node, i


def _parse_range(parts, i, spec):
    toks = _tokens(spec)
    names = []
    if ("op", ":=") in toks:
        at = toks.index(("op", ":="))
        names = [v for k, v in toks[:at] if k == "var"]
        if not names or len(names) > 2 or any(k not in ("var", "op") for k, _ in toks[:at]):
            raise TemplateError(f"cannot read {{{{ range {spec} }}}}")
        toks = toks[at + 1:]
    node = _Range(names, toks)
    node.body, stop = _parse_block(parts, i)
    i, word = stop
    if word == "else":
        node.otherwise, stop = _parse_block(parts, i)
        i, word = stop
    if word != "end":
        raise TemplateError(f"{{{{ {word} }}}} inside a range")
    return node, i


# --------------------------------------------------------------------------- evaluation
def truth(v) -> bool:
    """Go's truth: false, 0, nil and empty strings/lists/maps are false."""
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


def _and(*args):
    for a in args:
        if not truth(a):
            return a
    return args[-1]


def _or(*args):
    for a in args:
        if truth(a):
            return a
    return args[-1]


def _slice(x, *ix):
    if len(ix) == 0:
        return x
    if len(ix) == 1:
        return x[ix[0]:]
    return x[ix[0]:ix[1]]


FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b, "and": _and, "or": _or,
    "not": lambda a: not truth(a), "len": len, "index": lambda x, *ks: _index(x, ks), "slice": _slice,
    "print": lambda *a: "".join(_text(x) for x in a),
}


def _index(x, keys):
    for k in keys:
        x = x[k]
    return x


def _text(v) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class _Scope:
    def __init__(self, data):
        self.frames = [{"$": data}]

    def get(self, name):
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable {name}")

    def assign(self, name, value):
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise TemplateError(f"assignment to undeclared variable {name}")


def _field(value, path: str, where: str):
    for name in [p for p in path.split(".") if p]:
        if not isinstance(value, dict) or name not in value:
            raise TemplateError(f"{where}: no field {name!r}")
        value = value[name]
    return value


def _operand(tok, dot, scope):
    kind, text = tok
    if kind == "str":
        return _unquote(text)
    if kind == "raw":
        return text[1:-1]
    if kind == "num":
        return int(text)
    if kind == "field":
        return dot if text == "." else _field(dot, text, text)
    if kind == "var":
        name, _, path = text.partition(".")
        return _field(scope.get(name), path, text)
    if kind == "ident" and text in ("true", "false", "nil"):
        return {"true": True, "false": False, "nil": None}[text]
    raise TemplateError(f"unexpected {text!r}")


def _group(toks):
    """Split a command's tokens into operands, parenthesised groups kept whole."""
    out, i = [], 0
    while i < len(toks):
        if toks[i] == ("op", "("):
            depth, j = 1, i + 1
            while j < len(toks) and depth:
                depth += {("op", "("): 1, ("op", ")"): -1}.get(toks[j], 0)
                j += 1
            if depth:
                raise TemplateError("unbalanced parentheses")
            out.append(("group", toks[i + 1:j - 1]))
            i = j
        elif toks[i] == ("op", ")"):
            raise TemplateError("unbalanced parentheses")
        else:
            out.append(toks[i])
            i += 1
    return out


def _pipeline(toks, dot, scope):
    """A pipeline's value: commands separated by '|' (each result is the next one's last argument)."""
    if not toks:
        raise TemplateError("an empty action")
    commands, cur, depth = [], [], 0
    for t in toks:
        depth += {("op", "("): 1, ("op", ")"): -1}.get(t, 0)
        if t == ("op", "|") and depth == 0:
            commands.append(cur)
            cur = []
        else:
            cur.append(t)
    commands.append(cur)
    value, piped = None, False
    for cmd in commands:
        value = _command(_group(cmd), dot, scope, [value] if piped else [])
        piped = True
    return value


def _arg(item, dot, scope):
    if item[0] == "group":
        return _pipeline(item[1], dot, scope)
    return _operand(item, dot, scope)


def _command(items, dot, scope, extra):
    if not items:
        raise TemplateError("an empty command")
    head = items[0]
    if head[0] == "ident" and head[1] not in ("true", "false", "nil"):
        if head[1] not in FUNCS:
            raise TemplateError(f"function {head[1]!r} is outside the supported subset")
        args = [_arg(x, dot, scope) for x in items[1:]] + extra
        try:
            return FUNCS[head[1]](*args)
        except (TypeError, IndexError, KeyError) as err:
            raise TemplateError(f"{head[1]}: {err}") from None
    if len(items) != 1 or extra:
        raise TemplateError(f"cannot call {head[1]!r}")
    return _arg(head, dot, scope)


def _run(nodes, dot, scope, out):
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, tuple) and node[0] == "print":
            out.append(_text(_pipeline(node[1], dot, scope)))
        elif isinstance(node, tuple) and node[0] == "set":
            _, names, op, toks = node
            value = _pipeline(toks, dot, scope)
            if op == ":=":
                scope.frames[-1][names[0]] = value
            else:
                scope.assign(names[0], value)
        elif isinstance(node, _If):
            scope.frames.append({})
            try:
                for cond, body in node.branches:
                    if truth(_pipeline(cond, dot, scope)):
                        _run(body, dot, scope, out)
                        break
                else:
                    _run(node.otherwise, dot, scope, out)
            finally:
                scope.frames.pop()
        elif isinstance(node, _Range):
            items = _pipeline(node.pipe, dot, scope)
            if isinstance(items, dict):
                pairs = sorted(items.items())
            elif isinstance(items, (list, tuple)):
                pairs = list(enumerate(items))
            elif items is None:
                pairs = []
            else:
                raise TemplateError(f"range over {type(items).__name__}")
            if not pairs:
                _run(node.otherwise, dot, scope, out)
            for key, item in pairs:
                frame = {}
                if len(node.names) == 1:
                    frame[node.names[0]] = item
                elif len(node.names) == 2:
                    frame[node.names[0]], frame[node.names[1]] = key, item
                scope.frames.append(frame)
                try:
                    _run(node.body, item, scope, out)
                finally:
                    scope.frames.pop()


def render(source: str, data: dict) -> str:
    """``source`` rendered with ``data`` (dicts for structs: {"Messages": [{"Role", "Content"}], ...})."""
    nodes = parse(source)
    out: list[str] = []
    _run(nodes, data, _Scope(data), out)
    return "".join(out)
