"""One import namespace: workbench.*; no top-level `kernels` or `eval` is installed."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_live_under_the_workbench_namespace():
    import workbench.kernels

    assert Path(workbench.kernels.__file__).parent == ROOT / "kernels"


def test_no_top_level_kernels_or_eval_is_installed(tmp_path):
    # From a neutral directory, neither name may resolve to a module (ours or anyone's).
    code = "import importlib.util as u; print(u.find_spec('kernels'), u.find_spec('eval'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"]
    dist = importlib.metadata.distribution("parity-workbench")
    assert dist.entry_points.select(group="console_scripts", name="workbench")


def test_a_bare_kernels_import_from_the_repo_root_is_loud():
    # With the repo root on sys.path, `import kernels` would create a second module object.
    code = "import sys; sys.path.insert(0, %r); import kernels" % str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode != 0
    assert "workbench.kernels" in out.stderr


def test_import_works_from_any_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import workbench.kernels as k; print(len(k.registry()))"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 6


def test_the_wheel_maps_the_folders_into_one_namespace(tmp_path):
    # What `pip install .` (non-editable) installs: workbench/ and workbench/kernels/, nothing top-level besides.
    import zipfile

    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("parity_workbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "workbench/kernels/rms_norm.py" in names and "workbench/cli.py" in names
    # The YAML the stages load at run time: configs, the qualify gates, lm-eval tasks.
    for data in ("workbench/configs/default.yaml", "workbench/configs/gates.yaml",
                 "workbench/eval/tasks/wb_synthetic_mc.yaml"):
        assert data in names, data
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"workbench"}, tops
