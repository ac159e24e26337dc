"""The bench suites' plots (kernels roofline and timings, train curves and bars) and the
"against the previous report" section, from copies of two archived H100 reports (tests/fixtures/bench)."""
import copy
import json
from pathlib import Path

import pytest

from workbench.bench import compare as cmp
from workbench.bench import kernels as kbench
from workbench.bench import train as tbench

FIXTURES = Path(__file__).parent / "fixtures" / "bench"   # copies of two archived H100 reports
KERNEL_REPORT = FIXTURES / "kernels-2026-11-23-nvidia-h100-80gb-hbm3.json"
TRAIN_REPORT = FIXTURES / "train-2026-11-23-nvidia-h100-80gb-hbm3.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _doc(path):
    return json.loads(path.read_text())


def _row(rows, **match):
    (row,) = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return row


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot closes, so that a test can read what was drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed, close = [], plt.close

    def keep(fig=None):
        closed.append(fig)
        close(fig)
    monkeypatch.setattr(plt, "close", keep)
    return closed


def _texts(fig) -> list[str]:
    out = [fig._suptitle.get_text()] if fig._suptitle else []
    for ax in fig.axes:
        out += [t.get_text() for t in ax.texts] + [ax.get_title()]
        out += [t.get_text() for t in ax.get_yticklabels() + ax.get_xticklabels()]
        if ax.get_legend():
            out += [t.get_text() for t in ax.get_legend().get_texts()]
    return out


def _png(path, min_bytes=20_000):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, (data[:8], len(data))
    image = imread(path)
    assert image.shape[0] > 400 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05  # not a blank canvas
    return image


# --------------------------------------------------------------------------- kernels
def test_kernel_plot_draws_the_roofline_and_every_stack_with_a_failed_and_a_missing_one(tmp_path, figures):
    doc = _doc(KERNEL_REPORT)
    # Forward timed, then out of memory in the backward: a failed stack, not a forward-only one.
    _row(doc["rows"], kernel="rms_norm", stack="liger").update(fwd_bwd_ms=None, error="OOM: CUDA out of memory")
    doc["rows"].remove(_row(doc["rows"], kernel="rope", stack="torch.compile"))
    png = kbench.plot(doc, tmp_path / "kernels.png")
    assert png == tmp_path / "kernels.png"
    _png(png)
    (fig,) = figures
    roof, bars = fig.axes[:2]
    assert roof.get_xscale() == roof.get_yscale() == bars.get_xscale() == "log"
    texts = "\n".join(_texts(fig))
    assert "NVIDIA H100 80GB HBM3" in texts and "llama3-8b" in texts and "bfloat16" in texts
    # Only FLCE carries both counts: it is the one point, at its measured fraction of the compute roof.
    (point,) = kbench.roofline(doc)["points"]
    assert point["kernel"] == "fused_linear_cross_entropy"
    assert point["intensity"] == pytest.approx(25821343383552 / 3286237184)
    assert point["fraction"] == pytest.approx(25821343383552 / 42.522239685058594e-3 / 716611650328192.4)
    assert "fused_linear_cross_entropy\n85% of roof" in texts
    ceilings = doc["ceilings"]
    roof_y = [y for line in roof.get_lines() for y in line.get_ydata()]
    assert max(roof_y) == pytest.approx(ceilings["bf16_flops_per_s"])
    # The others are listed with their share of the one ceiling they were counted against.
    assert "rms_norm" in texts and "1.19 TB/s   40%" in texts and "592 TFLOP/s   83%" in texts
    kernels, stacks, times = kbench.stack_times(doc)
    assert stacks == ["ours", "eager", "torch.compile", "liger", "bitsandbytes"] and len(kernels) == 11
    assert times[("rms_norm", "liger")].startswith("OOM") and ("rope", "torch.compile") not in times
    assert times[("lora_o", "eager")] == _row(doc["rows"], kernel="lora_o", stack="torch (PEFT eager)")["fwd_bwd_ms"]
    assert times[("nf4_dequant", "ours")] == _row(doc["rows"], kernel="nf4_dequant", stack="ours")["fwd_ms"]
    assert len(bars.patches) == sum(isinstance(v, float) for v in times.values()) == 38
    assert "liger: failed" in texts and "nf4_dequant (fwd)" in texts
    assert {"ours", "eager", "torch.compile", "liger", "bitsandbytes", "floor"} <= set(_texts(fig))


def test_kernel_plot_of_a_cpu_run_without_ceilings_or_floors(tmp_path, figures):
    doc = _doc(KERNEL_REPORT)
    doc["ceilings"] = {}
    for r in doc["rows"]:
        if r["stack"] == "floor":
            r["fwd_bwd_ms"] = None
    doc["rows"] = [r for r in doc["rows"] if r["kernel"] in ("rms_norm", "swiglu")]
    kbench.plot(doc, tmp_path / "cpu.png", env={"device": "cpu (x86_64)", "date": "2026-01-01"})
    _png(tmp_path / "cpu.png", min_bytes=10_000)
    texts = "\n".join(_texts(figures[0]))
    assert "cpu (x86_64)" in texts and "no ceilings measured" in texts and "floor" not in texts
    assert "nothing to place" in texts and "share of its ceiling" not in texts


def test_kernel_markdown_embeds_the_png_only_when_named():
    doc = _doc(KERNEL_REPORT)
    env = doc["environment"]
    plain = kbench.markdown(doc, env, doc["command"])
    assert "![" not in plain and kbench.markdown(doc, env, doc["command"], None) == plain
    named = kbench.markdown(doc, env, doc["command"], png_name="2026-11-23-x.png")
    assert named.startswith(plain) and named.rstrip().endswith("(2026-11-23-x.png)")
    assert named.rstrip().splitlines()[-1].startswith("![")


# --------------------------------------------------------------------------- train
def test_train_plot_draws_curves_and_bars_with_ratios_and_a_failed_stack(tmp_path, figures):
    doc = _doc(TRAIN_REPORT)
    liger = copy.deepcopy(_row(doc["runs"], mode="lora", stack="ours"))
    liger.update(stack="liger", label="Liger-Kernel via TRL", tokens_per_s=470.0, peak_memory_gib=2.5)
    failed = {"mode": "qlora", "stack": "liger", "label": "Liger-Kernel via TRL", "wall_s": 3.0, "exit_code": 1,
              "error": "RuntimeError: boom"}
    doc["runs"] += [liger, failed]
    png = tbench.plot(doc, tmp_path / "train.png")
    _png(png)
    (fig,) = figures
    assert len(fig.axes) == 4
    loss_lora, loss_qlora, speed, memory = fig.axes
    assert len(loss_lora.get_lines()) == 3 and len(loss_qlora.get_lines()) == 3  # the failed one: legend only
    assert "Liger-Kernel via TRL: failed" in [t.get_text() for t in loss_qlora.get_legend().get_texts()]
    assert len(speed.patches) == len(memory.patches) == 5  # 2 modes x (hf, ours) + lora liger
    assert sorted(p.get_height() for p in speed.patches) == sorted([423.1, 512.9, 771.8, 662.9, 470.0])
    speed_texts = [t.get_text() for t in speed.texts]
    memory_texts = [t.get_text() for t in memory.texts]
    assert "513\n1.21x" in speed_texts and "663\n0.86x" in speed_texts and f"470\n{470 / 423.1:.2f}x" in speed_texts
    assert "423" in speed_texts  # hf: no ratio to itself
    assert "2.86\n0.94" in memory_texts and "2.47\n1.00" in memory_texts
    assert speed_texts.count("failed") == memory_texts.count("failed") == 1


def test_train_plot_without_an_hf_run_has_no_ratios(tmp_path, figures):
    doc = _doc(TRAIN_REPORT)
    doc["runs"] = [r for r in doc["runs"] if r["stack"] != "hf" and r["mode"] == "lora"]
    _png(tbench.plot(doc, tmp_path / "t.png"), min_bytes=10_000)
    speed = figures[0].axes[1]
    assert [t.get_text() for t in speed.texts] == ["513"]


# --------------------------------------------------------------------------- previous report
def _write(directory, name, doc, **changes):
    doc = copy.deepcopy(doc)
    env = changes.pop("environment", {})
    doc["environment"].update(env)
    doc.update(changes)
    (directory / name).write_text(json.dumps(doc))
    return directory / name


def _at(day: str, clock: str = "12:00:00") -> dict:
    return {"date": day, "time_utc": f"{day}T{clock}Z"}


def test_previous_report_picks_the_newest_earlier_report_of_the_same_device_and_setup(tmp_path):
    doc = _doc(KERNEL_REPORT)
    current = "2026-11-23-nvidia-h100-80gb-hbm3.json"
    _write(tmp_path, current, doc)
    _write(tmp_path, "2026-11-01-nvidia-h100-80gb-hbm3.json", doc, environment=_at("2026-11-01"))
    _write(tmp_path, "2026-11-10-nvidia-h100-80gb-hbm3.json", doc, environment=_at("2026-11-10"))
    _write(tmp_path, "2026-11-20-nvidia-h200.json", doc,
           environment={**_at("2026-11-20"), "device": "NVIDIA H200", "device_slug": "nvidia-h200"})
    _write(tmp_path, "2026-11-21-nvidia-h100-80gb-hbm3-1b.json", doc, environment=_at("2026-11-21"),
           shape="llama3.2-1b")
    _write(tmp_path, "2026-11-22-nvidia-h100-80gb-hbm3-fp16.json", doc, environment=_at("2026-11-22"),
           dtype="float16")
    _write(tmp_path, "2026-12-01-nvidia-h100-80gb-hbm3.json", doc, environment=_at("2026-12-01"))  # after doc
    _write(tmp_path, "2026-11-22-train.json", _doc(TRAIN_REPORT), environment=_at("2026-11-22"))
    (tmp_path / "notes.json").write_text("{not json")
    assert cmp.previous_report(tmp_path, doc, current).name == "2026-11-10-nvidia-h100-80gb-hbm3.json"
    # Without the name of the file being written, that file (same time as doc) is the newest.
    assert cmp.previous_report(tmp_path, doc).name == current
    (tmp_path / "2026-11-10-nvidia-h100-80gb-hbm3.json").unlink()
    assert cmp.previous_report(tmp_path, doc, current).name == "2026-11-01-nvidia-h100-80gb-hbm3.json"
    (tmp_path / "2026-11-01-nvidia-h100-80gb-hbm3.json").unlink()
    assert cmp.previous_report(tmp_path, doc, current) is None
    assert cmp.previous_report(tmp_path / "missing", doc, current) is None


def test_previous_report_orders_by_time_then_date_and_matches_train_settings(tmp_path):
    doc = _doc(TRAIN_REPORT)
    _write(tmp_path, "a.json", doc, environment=_at("2026-11-23", "08:00:00"))
    _write(tmp_path, "b.json", doc, environment=_at("2026-11-23", "07:00:00"))
    _write(tmp_path, "c.json", doc, environment=_at("2026-11-23", "20:00:00"))  # after doc's 19:22
    _write(tmp_path, "d.json", doc, environment=_at("2026-11-23", "09:00:00"), batch=4)
    _write(tmp_path, "e.json", doc, environment=_at("2026-11-23", "10:00:00"), seq=2048)
    _write(tmp_path, "f.json", doc, environment=_at("2026-11-23", "11:00:00"), steps=60)
    assert cmp.previous_report(tmp_path, doc, "current.json").name == "a.json"
    # A report with a date only sorts by its date.
    dated = copy.deepcopy(doc)
    dated["environment"].pop("time_utc")
    dated["environment"]["date"] = "2026-11-24"
    (tmp_path / "g.json").write_text(json.dumps(dated))
    assert cmp.previous_report(tmp_path, doc, "current.json").name == "a.json"  # the 24th is after doc
    later = copy.deepcopy(doc)
    later["environment"] = {**doc["environment"], **_at("2026-11-25")}
    assert cmp.previous_report(tmp_path, later, "current.json").name == "g.json"


def test_previous_section_flags_a_slower_kernel_and_passes_an_identical_rerun(tmp_path):
    old = _doc(KERNEL_REPORT)
    _write(tmp_path, "2026-11-22-nvidia-h100-80gb-hbm3.json", old, environment=_at("2026-11-22"))
    text, regressed = cmp.previous_section(tmp_path, old, "2026-11-23-nvidia-h100-80gb-hbm3.json")
    assert not regressed
    assert text.startswith("## Against the previous report\n") and "# Benchmark regression check" not in text
    assert "**Verdict:** no regression" in text and "2026-11-22-nvidia-h100-80gb-hbm3.json" in text
    assert "| rms_norm / 8192x4096 / ours | fwd_bwd_ms |" in text and "**regression**" not in text

    new = copy.deepcopy(old)
    _row(new["rows"], kernel="rms_norm", stack="ours")["fwd_bwd_ms"] *= 1.3
    text, regressed = cmp.previous_section(tmp_path, new, "2026-11-23-nvidia-h100-80gb-hbm3.json")
    assert regressed and "**Verdict:** REGRESSION (1)" in text
    (flagged,) = [line for line in text.splitlines() if "**regression**" in line]
    assert flagged.startswith("| rms_norm / 8192x4096 / ours | fwd_bwd_ms |") and "1.300×" in flagged
    # Tighter thresholds are passed through.
    _row(new["rows"], kernel="rms_norm", stack="ours")["fwd_bwd_ms"] /= 1.3 / 1.05
    assert not cmp.previous_section(tmp_path, new, None)[1]
    assert cmp.previous_section(tmp_path, new, None, {"time": 0.03})[1]


def test_previous_section_without_an_earlier_report(tmp_path):
    doc = _doc(TRAIN_REPORT)
    _write(tmp_path, "other.json", doc, environment={"device": "NVIDIA H200", "device_slug": "nvidia-h200"})
    text, regressed = cmp.previous_section(tmp_path, doc, "2026-11-23-nvidia-h100-80gb-hbm3.json")
    assert not regressed and text.startswith("## Against the previous report\n\nNo earlier train report")
    assert "NVIDIA H100 80GB HBM3" in text and "shape llama3.2-1b, batch 8, steps 30, seed 0" in text
    assert "|" not in text
