"""The versions scripts/versions.env pins, and the shared virtual environment,
for the Python scripts and benches (standard library only).

    import pins
    pins.pin("onnxruntime")                 # "1.31.1"
    python = pins.venv_python("torch")      # ${DEPTHC_CACHE:-.cache}/venv/bin/python, torch added

A bench imports it after ``sys.path.insert(0, "<repo>/scripts")``.
"""

import os
import subprocess

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
VERSIONS = os.path.join(SCRIPTS, "versions.env")


def versions(path=VERSIONS):
    """Every NAME=value line of versions.env, as {NAME: value}."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, value = line.partition("=")
                out[name.strip()] = value.strip()
    return out


def pin(package):
    """The version pinned for a PyPI package (its name in upper case, '-' as '_'
    in versions.env); KeyError when none is."""
    return versions()[package.upper().replace("-", "_").replace(".", "_")]


def venv_python(*packages):
    """The shared virtual environment's python, made when missing and with each
    of `packages` (PyPI names) installed at its pinned version: scripts/venv.sh."""
    r = subprocess.run([os.path.join(SCRIPTS, "venv.sh"), *packages], stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"scripts/venv.sh {' '.join(packages)} failed (exit {r.returncode})")
    return r.stdout.strip().splitlines()[-1]
