"""The gemma4x command line: demo, generate, and clean failures (exit code 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma4x import checkpoint, presets
from gemma4x.cli import main

PYTHON_DIR = str(Path(__file__).resolve().parents[2] / "python")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The demo's checkpoint, written once: tiny-moe random weights + tiny tokenizer."""
    out = tmp_path_factory.mktemp("tiny")
    config = presets.preset("tiny-moe")
    checkpoint.write_random_checkpoint(out, config)
    pytest.importorskip("tokenizers")
    checkpoint.write_tiny_tokenizer(out, config["text_config"]["vocab_size"])
    return out


def _run(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_demo_writes_loads_and_generates(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    rc, out, err = _run(capsys, "demo", "--device", "cpu", "--max-new-tokens", "5", "--out", str(tmp_path))
    assert rc == 0, err
    assert "Gemma4Runtime.from_pretrained" in out
    assert out.count("-> 5 tokens") + out.count("(stop)") >= 2
    assert "prefill:" in out and "decode:" in out and "tok/s" in out
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()


def test_generate_with_token_ids(tiny_dir, capsys):
    rc, out, err = _run(capsys, "generate", "--model", str(tiny_dir), "--token-ids", "2,10,20,30",
                        "--max-new-tokens", "6", "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    ids = [int(t) for t in out.strip().split(",")]
    assert 1 <= len(ids) <= 6 and all(0 <= t < 512 for t in ids)
    assert "prefill: 4 tokens" in err and "tok/s" in err
    # Greedy is deterministic; bf16 runs too.
    rc2, out2, _ = _run(capsys, "generate", "--model", str(tiny_dir), "--token-ids", "2,10,20,30",
                        "--max-new-tokens", "6", "--device", "cpu")  # fmt: skip
    assert rc2 == 0 and out2 == out
    rc3, out3, err3 = _run(capsys, "generate", "--model", str(tiny_dir), "--token-ids", "2 10 20",
                           "--max-new-tokens", "3", "--device", "cpu", "--dtype", "bf16")  # fmt: skip
    assert rc3 == 0, err3
    assert "[cpu, bfloat16]" in err3


def test_generate_with_text_prompt_and_sampling(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "The quick brown fox", "--max-new-tokens", "4",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "5", "--device", "cpu"]  # fmt: skip
    rc, out, err = _run(capsys, *args)
    assert rc == 0, err
    assert out.startswith("The quick brown fox")
    rc, again, _ = _run(capsys, *args)
    assert again == out, "a fixed seed reproduces the sample"


def _expect_error(capsys, argv, needle):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (out, err)
    assert needle in err, err
    assert "Traceback" not in err


def test_error_exit_codes(tiny_dir, tmp_path, capsys):
    gen = ["generate", "--device", "cpu", "--max-new-tokens", "2"]
    _expect_error(capsys, [*gen, "--model", str(tmp_path / "nope"), "--token-ids", "2"], "no such directory")
    _expect_error(capsys, [*gen, "--model", str(tmp_path), "--token-ids", "2"], "no config.json")
    _expect_error(capsys, [*gen, "--model", str(tiny_dir), "--token-ids", "2,x"], "comma-separated integers")
    _expect_error(capsys, [*gen, "--model", str(tiny_dir), "--token-ids", "2,512"], "outside the vocabulary")
    _expect_error(capsys, [*gen, "--model", str(tiny_dir), "--token-ids", "2", "--temperature", "-1"], "temperature")
    _expect_error(capsys, ["generate", "--model", str(tiny_dir)], "one of the arguments --prompt --token-ids")
    _expect_error(capsys, ["bogus"], "invalid choice")
    if not torch.cuda.is_available():
        _expect_error(capsys, [*gen, "--model", str(tiny_dir), "--token-ids", "2", "--device", "cuda"], "no CUDA")

    # A checkpoint without tokenizer.json cannot take a text prompt.
    bare = checkpoint.write_random_checkpoint(tmp_path / "bare", presets.preset("tiny-moe"))
    _expect_error(capsys, [*gen, "--model", str(bare), "--prompt", "hi"], "no tokenizer.json")
    # A corrupt weight file and a bad config are reported, naming the file / field.
    (bare / "model.safetensors").write_bytes((bare / "model.safetensors").read_bytes()[:-100])
    _expect_error(capsys, [*gen, "--model", str(bare), "--token-ids", "2"], "model.safetensors: truncated")
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    _expect_error(capsys, [*gen, "--model", str(bare), "--token-ids", "2"], "unsupported model_type 'llama'")


def test_python_dash_m_runs_the_demo(tmp_path):
    pytest.importorskip("tokenizers")
    env = {**os.environ, "PYTHONPATH": PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "gemma4x", "demo", "--device", "cpu", "--max-new-tokens", "3"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "gemma4x", "generate", "--model", str(tmp_path), "--token-ids", "1"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "no config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_text_prompt_without_the_tokenizers_package(tiny_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    _expect_error(capsys, ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--device", "cpu"],
                  "pip install 'gemma4x[tokenizer]'")  # fmt: skip
    from gemma4x.tokenizer import optional_tokenizer

    assert optional_tokenizer(tiny_dir) is None


def test_demo_without_the_tokenizers_package(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    rc, out, err = _run(capsys, "demo", "--device", "cpu", "--max-new-tokens", "3")
    assert rc == 0, err
    assert "no tokenizer" in out and "ids:" in out and "text:" not in out and "tok/s" in out


def test_generate_quantized_at_load(tiny_dir, capsys):
    rc, out, err = _run(capsys, "generate", "--model", str(tiny_dir), "--token-ids", "2,10,20,30",
                        "--max-new-tokens", "4", "--device", "cpu", "--quantize", "nvfp4")  # fmt: skip
    assert rc == 0, err
    assert 1 <= len(out.strip().split(",")) <= 4
    rc, _, err = _run(capsys, "generate", "--model", str(tiny_dir), "--token-ids", "2",
                      "--device", "cpu", "--quantize", "int4")  # fmt: skip
    assert rc == 2 and "--quantize" in err
