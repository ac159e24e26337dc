"""The run report as a newcomer reads it: the qualify verdict linked at the top, what
the perplexities are over, the GGUF LoRA adapter and the Modelfiles in the export
section, no word on GGUF types nobody asked for, limits drawn on verification.png
(top-1 on its whole scale) and eval.png's perplexity panel relative to the adapter."""
import json

import pytest

from test_report import _rest, _train
from workbench import manifest, report, report_adapter


def _adapter(run):
    """Add what `workbench export --adapter-gguf` records to the test run's export stage."""
    rec = manifest.stage(run, "export")
    m = {"kl_mean": 6.5e-7, "top1_agreement": 1.0, "ppl_rel_delta": 9e-5, "positions": 512}
    q8 = {"kl_mean": 3.1e-4, "top1_agreement": 0.953, "ppl_rel_delta": 6.6e-3, "positions": 512}
    rec["adapter"] = {"path": "export/adapter-f16.gguf", "bytes": 17024, "alpha": 8.0, "ranks": [4], "passed": True,
                      "bases": {"f16": {"path": "export/base-f16.gguf", "bytes": 2**20, "llama_cpp": m, "passed": True},
                                "q8_0": {"path": "export/base-q8_0.gguf", "bytes": 2**19, "llama_cpp": q8,
                                         "passed": True}}}
    rec["modelfiles"] = {"f16": "export/model-f16.Modelfile", "adapter": "export/adapter-f16.Modelfile"}
    manifest.record_stage(run, "export", rec)
    path = run / "export" / "export_report.json"
    doc = json.loads(path.read_text())
    limits = {"f16": {"kl_mean": 1e-5, "top1_agreement": 0.98}, "q8_0": {"kl_mean": 3e-3, "top1_agreement": 0.85}}
    doc["adapter"] = {"thresholds": limits, "reference": "the PEFT adapter on its base in transformers, unmerged, fp32",
                      "bases": {k: {"without_adapter": {"kl_mean": 0.23, "top1_agreement": 0.15}, "failures": []}
                                for k in ("f16", "q8_0")}}
    doc["modelfiles"] = {"template": True, "stops": ["<|im_end|>", "<|im_start|>"]}
    path.write_text(json.dumps(doc))
    from workbench.eval.compare import DEFAULT_TOLERANCES

    manifest.record_stage(run, "eval", {**manifest.stage(run, "eval"), "tolerances": DEFAULT_TOLERANCES})


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    _train(run)
    _rest(run)
    _adapter(run)
    return run


def test_the_report_links_the_qualify_verdict_and_says_when_it_is_of_earlier_artifacts(run):
    md = (report.render(run)["md"]).read_text()
    assert "**Qualification: not run yet.** `workbench qualify --run" in md
    stages = manifest.read(run)["stages"]
    verdict = {"verdict": "PASS", "summary": "every gate passed", "environment": {"time_utc": "2026-01-02T03:04:05Z"},
               "artifacts": {n: {rel: {"sha256": r["sha256"]} for rel, r in (stages[n].get("outputs") or {}).items()}
                             for n in ("train", "merge", "export", "eval")}}
    (run / "qualify").mkdir()
    (run / "qualify" / "verdict.json").write_text(json.dumps(verdict))
    md = (report.render(run)["md"]).read_text()
    assert ("**Qualification: PASS** (every gate passed) — [qualify/verdict.md](../qualify/verdict.md), "
            "`workbench qualify` at 2026-01-02T03:04:05Z.") in md
    verdict["artifacts"]["train"]["train/loss.jsonl"]["sha256"] = "0" * 64    # a train output it did not see
    (run / "qualify" / "verdict.json").write_text(json.dumps(verdict))
    md = (report.render(run)["md"]).read_text()
    assert "**It was made on earlier artifacts**" in md


def test_the_report_says_what_the_perplexities_are_over_and_shows_the_adapter_gguf(run):
    md = (report.render(run)["md"]).read_text()
    assert report_adapter.PERPLEXITY_NOTE in md
    assert "no chat template" in md and "loss on the replies only" in md
    assert "### GGUF LoRA adapter" in md and "adapter.lora.alpha 8" in md
    assert "| `base-f16.gguf` | 1.00 MiB | 6.500e-07 | 1.000e-05 | 1 | 0.98 |" in md
    assert "`adapter-f16.Modelfile`" in md and "stop tokens `<|im_end|>`, `<|im_start|>`" in md
    summary = report.summary_table(run)
    assert "| adapter GGUF |" in summary and "KL 6.5e-07 on the f16 base" in summary
    data = json.loads((run / "report" / "report.json").read_text())
    assert data["sections"]["export"]["adapter"]["bases"]["q8_0"]["thresholds"]["kl_mean"] == 3e-3


def test_plots_draw_each_limit_and_top1_on_its_whole_scale(run, monkeypatch):
    drawn = []
    original = report_adapter.draw_limits

    def record(ax, xs, limits, label, color="black"):
        drawn.append((ax, list(limits)))
        original(ax, xs, limits, label, color)

    monkeypatch.setattr(report_adapter, "draw_limits", record)
    report.render(run)
    (kl_ax, kl), (top1_ax, top1), (ppl_ax, upper), (_, lower) = drawn
    # merged (bfloat16: qualify's merge limit), f16, q4_k_m GGUF, the adapter on the f16 and q8_0 base.
    assert kl == [1e-3, 1e-5, 0.1, 1e-5, 3e-3]
    assert top1 == [0.95, None, None, 0.98, 0.85] and top1_ax.get_ylim()[0] == 0
    assert [t.get_text() for t in kl_ax.get_xticklabels()][-1] == "adapter GGUF\non q8_0 base"
    # eval.png: merged, f16, q4_k_m relative to the adapter (20.0), in percent, with each one's eval tolerance.
    heights = [p.get_height() for p in ppl_ax.patches]
    assert heights == pytest.approx([0.0, 0.0, 10.0])
    assert upper == pytest.approx([0.1, 0.5, 10.0]) and lower == pytest.approx([-0.1, -0.5, -10.0])
