"""Ollama Modelfiles: the chat template translated into Ollama's Go-template syntax
renders, for the built-in chat rows, exactly the text of the HF chat template; stop
tokens and the run's decoding; a template that cannot be translated is left out with
a note; the Go-template subset renderer behaves like Go's text/template."""
import pytest

from workbench import synthetic
from workbench.export import gotemplate, modelfile
from workbench.tokenizer import default_tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def rows():
    return synthetic.build(seed=0)["test"]


def test_the_built_in_template_renders_the_hf_text_for_every_built_in_chat_row(tok, rows):
    t = modelfile.translate(tok, rows)
    assert t.template is not None, t.note
    text = modelfile.render("model-q8_0.gguf", t, num_ctx=256, max_new_tokens=32)
    template = modelfile.parse(text)["TEMPLATE"]           # what Ollama would read from the file
    assert template == t.template
    checked = 0
    for r in rows:
        prompt = r["prompt"]
        # The generation prompt Ollama sends after a user turn ...
        want = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert modelfile.ollama_text(template, prompt) == want
        # ... and the conversation with the reply, which Ollama continues (the last turn left open).
        full = tok.apply_chat_template(prompt + r["completion"], tokenize=False, continue_final_message=True)
        assert modelfile.ollama_text(template, prompt + r["completion"]) == full
        checked += 2
    assert checked == 2 * len(rows) >= 300
    system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2 plus 2?"}]
    assert modelfile.ollama_text(template, system) == tok.apply_chat_template(system, tokenize=False,
                                                                              add_generation_prompt=True)
    assert modelfile.ollama_text(template, system).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_the_modelfile_has_from_stops_and_the_runs_decoding(tok, rows):
    t = modelfile.translate(tok, rows)
    parsed = modelfile.parse(modelfile.render("model-q8_0.gguf", t, num_ctx=256, max_new_tokens=32))
    assert parsed["FROM"] == "./model-q8_0.gguf" and parsed["ADAPTER"] is None
    params = parsed["PARAMETER"]
    assert [v for k, v in params if k == "stop"] == ["<|im_end|>", "<|im_start|>"]
    assert ("temperature", "0") in params and ("num_predict", "32") in params and ("num_ctx", "256") in params
    adapter = modelfile.parse(modelfile.render("base-f16.gguf", t, adapter="adapter-f16.gguf"))
    assert adapter["FROM"] == "./base-f16.gguf" and adapter["ADAPTER"] == "./adapter-f16.gguf"
    assert adapter["TEMPLATE"] == t.template


# A Llama-3-style template (header tokens around the role, a BOS the runtime adds itself),
# written here for the test, and a Gemma-style one (the assistant is called "model", the
# system turn is folded into the first user turn), which has no per-message shape.
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}{% else %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _with_template(template, **specials):
    tok = default_tokenizer()
    tok.chat_template = template
    for k, v in specials.items():
        setattr(tok, k, v)
    return tok


def test_a_llama3_style_template_translates_and_leaves_the_bos_to_the_runtime(tok, rows):
    t3 = _with_template(LLAMA3_LIKE, bos_token="<|endoftext|>")
    t = modelfile.translate(t3, rows, add_bos=True)
    assert t.template is not None, t.note
    assert "<|start_header_id|>" in t.template and "<|endoftext|>" not in t.template
    conv = rows[0]["prompt"]
    want = t3.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert modelfile.ollama_text(t.template, conv) == want.removeprefix("<|endoftext|>")


def test_a_template_that_cannot_be_translated_is_left_out_with_a_note(tok, rows):
    t = modelfile.translate(_with_template(GEMMA_LIKE), rows)
    assert t.template is None and "renames roles" in t.note
    text = modelfile.render("model-f16.gguf", t)
    assert modelfile.parse(text)["TEMPLATE"] is None
    assert "# No TEMPLATE: " in text and "Write one by hand" in text
    none = modelfile.translate(_with_template(None), rows)
    assert none.template is None and "no chat template" in none.note


def test_a_translation_that_renders_differently_is_refused(tok, rows, monkeypatch):
    """The check is what makes a TEMPLATE trustworthy: break the Go side and it is left out."""
    monkeypatch.setattr(modelfile, "_SHAPE", modelfile._SHAPE.replace("{gen}", "{gen}\n"))
    t = modelfile.translate(tok, rows)
    assert t.template is None and "renders differently" in t.note


# --------------------------------------------------------------------------- the Go-template subset
@pytest.mark.parametrize("source, data, want", [
    ("x  {{- .A -}}  y", {"A": "1"}, "x1y"),
    ("{{ if .A }}yes{{ else if .B }}b{{ else }}no{{ end }}", {"A": "", "B": 0}, "no"),
    ("{{ if .A }}yes{{ else if .B }}b{{ else }}no{{ end }}", {"A": "", "B": 2}, "b"),
    ("{{ range $i, $m := .L }}{{ if $i }},{{ end }}{{ $i }}={{ .N }}{{ end }}", {"L": [{"N": "a"}, {"N": "b"}]},
     "0=a,1=b"),
    ("{{ range .L }}x{{ else }}empty{{ end }}", {"L": []}, "empty"),
    ("{{ $n := 0 }}{{ range .L }}{{ $n = . }}{{ end }}{{ $n }}", {"L": [3, 4]}, "4"),
    ("{{ len (slice .L 1) }} {{ index .L 0 }} {{ eq .S \"a\\\"b\" }} {{ .S | len }}", {"L": [1, 2, 3], "S": 'a"b'},
     "2 1 true 3"),
    ("{{ and 1 0 }} {{ or 0 \"\" 5 }} {{ not .X }}{{/* a comment */}}", {"X": []}, "0 5 true"),
])
def test_the_renderer_follows_go_text_template(source, data, want):
    assert gotemplate.render(source, data) == want


@pytest.mark.parametrize("source", ["{{ with .A }}x{{ end }}", "{{ if .A }}x", "{{ end }}", "{{ printf \"%d\" 1 }}",
                                    "{{ .Missing }}", "{{ if .A }}{{ else }}{{ else }}{{ end }}"])
def test_the_renderer_refuses_what_it_does_not_implement(source):
    with pytest.raises(gotemplate.TemplateError):
        gotemplate.render(source, {"A": True})
