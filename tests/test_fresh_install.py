"""The main job on a fresh machine: the corpus is inside the package, so `fastgpt train` needs no
path, no environment variable and no network."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# Loaded by every Python process that finds it on sys.path: any network connection fails.
NO_NETWORK = '''
import socket

def _refuse(*args, **kwargs):
    raise OSError("network disabled by the test")

socket.socket.connect = _refuse
socket.create_connection = _refuse
'''


def test_wheel_carries_the_corpus(tmp_path):
    # FASTGPT_NO_AOT: package the Python side only (the ahead-of-time C++ build is not under test)
    env = {**os.environ, "FASTGPT_NO_AOT": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, env=env, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("fastgpt-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo("fastgpt/run/corpus/tinyshakespeare.txt.bz2")
    assert 300_000 < info.file_size < 400_000


def test_train_with_no_corpus_given_and_no_network(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if k not in ("FASTGPT_DATA", "PYTHONPATH")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-m", "fastgpt", "train", "--max-iters", "3", "--eval-iters", "1",
                           "--sample-tokens", "40", "--backend", "sdpa", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preset 'cpu'" in proc.stdout and "3 iterations in" in proc.stdout
    state = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert len(state["vocab"]) == 65  # tiny-shakespeare's symbols
    # the sample printed after training: a newline prompt, then 40 characters
    sample = proc.stdout.split("iterations in", 1)[1].split("\n", 1)[1]
    assert len(sample) >= 1 + 40 and set(sample) <= set(state["vocab"])
