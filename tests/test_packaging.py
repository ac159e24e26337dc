"""One import namespace: workbench.*; no top-level `kernels` or `eval` is installed."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_live_under_the_workbench_namespace():
    import workbench.kernels

    assert Path(workbench.kernels.__file__).parent == ROOT / "src" / "workbench" / "kernels"


def test_no_top_level_kernels_or_eval_of_ours_is_installed(tmp_path):
    # From a neutral directory, `kernels` is the PyPI distribution (transformers >= 5.25
    # requires it) or nothing, never a folder of this checkout; `eval` resolves to nothing.
    code = ("import importlib.util as u; s = u.find_spec('kernels'); "
            "print(s.origin if s else None, u.find_spec('eval'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    kernels_origin, eval_spec = out.stdout.split()
    assert eval_spec == "None"
    assert kernels_origin == "None" or not Path(kernels_origin).resolve().is_relative_to(ROOT / "src"), kernels_origin
    dist = importlib.metadata.distribution("parity-workbench")
    assert dist.entry_points.select(group="console_scripts", name="workbench")


def _repo_dirs():
    """The repository's own folders a user or a tool may run Python from (sys.path[0])."""
    skip = {".git", ".venv", "runs", "build", "dist", "src", "__pycache__", ".hypothesis", ".pytest_cache"}
    yield ROOT
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).parts
        if path.is_dir() and not (set(rel) & skip) and not rel[0].startswith("."):
            yield path


def test_no_folder_of_ours_answers_for_kernels_or_eval_from_any_repo_folder():
    # src layout: from the root, tests/, parity/, bench/ (where pytest and `python -m` put their
    # folder on sys.path) and every other folder of the checkout, `kernels` resolves to the
    # PyPI distribution (transformers requires it) or to nothing, and `eval` to nothing.
    dirs = [str(d) for d in _repo_dirs()]
    code = ("import importlib.util as u, json, sys\n"
            "out = {}\n"
            "for d in json.loads(sys.argv[1]):\n"
            "    sys.path.insert(0, d); u.sys.modules.pop('kernels', None)\n"
            "    for name in ('kernels', 'eval'):\n"
            "        s = u.find_spec(name); out[d + ':' + name] = s.origin if s else None\n"
            "    sys.path.pop(0)\n"
            "print(json.dumps(out))")
    import json

    proc = subprocess.run([sys.executable, "-c", code, json.dumps(dirs)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert len(found) == 2 * len(dirs) and all(str(ROOT / d) in dirs for d in ("tests", "parity", "bench"))
    # An installed distribution may live in a virtual environment inside the checkout
    # (.venv, .venv-latest): site-packages is not ours.
    ours = {k: v for k, v in found.items()
            if v and Path(v).resolve().is_relative_to(ROOT) and "site-packages" not in Path(v).parts}
    assert not ours, ours
    assert all(v is None for k, v in found.items() if k.endswith(":eval")), found


def test_transformers_and_peft_import_from_the_repo_root():
    # The old failure: `python -c` from the root (the root on sys.path) broke `import peft`.
    proc = subprocess.run([sys.executable, "-c", "from workbench.offline import enforce_offline; "
                           "enforce_offline(); import peft, transformers, workbench.kernels"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


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
    assert "workbench/kernels/rms_norm.py" in names and "workbench/cli/__init__.py" in names
    assert "workbench/cli/bench.py" in names and "workbench/bench/train_child.py" in names
    # The YAML the stages load at run time: configs, the qualify gates, lm-eval tasks.
    for data in ("workbench/configs/default.yaml", "workbench/configs/gates.yaml",
                 "workbench/eval/tasks/wb_synthetic_mc.yaml"):
        assert data in names, data
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"workbench"}, tops
