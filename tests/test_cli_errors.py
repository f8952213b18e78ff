"""A user's input error reaches the console as one line, `error: <what> (<path>): <why>; <what to do>`,
exit 2, no traceback, within 3 s of CPU (before Ray starts); `--debug` shows the traceback.
(tests/test_error_contract.py: the same contract for every kind of bad input.)"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import pytest

from lumo_ray.cli import main


def run_lumo(args, env=None, cwd=None, timeout: float = 120):
    """`python -m lumo_ray.cli *args` -> (CompletedProcess, CPU seconds, wall seconds). The CPU seconds
    are the process's own: on a shared, loaded machine its wall time says more about the neighbours."""
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "lumo_ray.cli", *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    watchdog = threading.Timer(timeout, os.kill, (p.pid, signal.SIGKILL))
    watchdog.start()
    with futures.ThreadPoolExecutor(2) as io:  # both pipes drained while the process runs
        out, err = io.submit(p.stdout.read), io.submit(p.stderr.read)
        _, status, usage = os.wait4(p.pid, 0)  # its resource usage, which subprocess.run does not report
    watchdog.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    return (subprocess.CompletedProcess(p.args, p.returncode, out.result(), err.result()),
            usage.ru_utime + usage.ru_stime, time.time() - t0)


def _lumo(*args, env=None):
    p, cpu, _ = run_lumo(args, env=env)
    return p, cpu


def _one_line_error(p, cpu, *needles):
    err = p.stderr.strip()
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], err[-2000:])
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in p.stdout + p.stderr
    assert cpu < 3.0, f"{cpu:.1f} s of CPU"
    for n in needles:
        assert n in err, err
    return err


def test_normalize_missing_input(tmp_path):
    p, secs = _lumo("data", "normalize", "--source", "llava_pretrain", "--input", str(tmp_path / "nope.json"),
                    "--out", str(tmp_path / "out"))
    _one_line_error(p, secs, "llava_pretrain input", str(tmp_path / "nope.json"), "not found", "give the dataset")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,why", [('{"a": 1}', "expected a JSON list of samples, got a dict"),
                                      ("[{", "not valid JSON")])
def test_normalize_malformed_metadata(tmp_path, text, why):
    meta = tmp_path / "meta.json"
    meta.write_text(text)
    p, secs = _lumo("data", "normalize", "--source", "llava_pretrain", "--input", str(meta), "--out", str(tmp_path / "o"))
    _one_line_error(p, secs, str(meta), why)


def test_tokenize_missing_manifest(tmp_path):
    p, secs = _lumo("data", "tokenize", "--manifest", str(tmp_path / "manifest.jsonl"), "--out", str(tmp_path / "s"))
    _one_line_error(p, secs, "manifest", "not found", "lumo data normalize")
    assert not (tmp_path / "s").exists()  # nothing written for a run that cannot start


def test_vlm_ablation_on_an_empty_run_directory(tmp_path):
    (tmp_path / "run").mkdir()
    p, secs = _lumo("eval", "vlm-ablation", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "rep"))
    _one_line_error(p, secs, "VLM run", str(tmp_path / "run"), "no export/")


@pytest.mark.parametrize("task,name,data,why", [("i2t", "x.png", b"\x89PNG\r\n\x1a\nnot really", "undecodable image"),
                                                ("a2t", "x.wav", b"RIFF0000WAVEjunk", "truncated audio")])
def test_generate_with_a_corrupt_input(tmp_path, task, name, data, why):
    f = tmp_path / name
    f.write_bytes(data)
    p, secs = _lumo("generate", "--run", str(tmp_path / "run"), "--task", task, "--input", str(f),
                    "--out", str(tmp_path / "g"))
    _one_line_error(p, secs, f"--input of {task}", str(f), why, "give a readable")


def test_config_error_is_one_line(tmp_path):
    p, secs = _lumo("uti", "build", "--out", str(tmp_path / "u"), "--set", "uti.audio.bandwith=3.0")
    _one_line_error(p, secs, "error: config:", "bandwith")


def test_debug_shows_the_traceback(tmp_path, capsys):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": 1}))
    argv = ["data", "normalize", "--source", "llava_pretrain", "--input", str(meta), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    with pytest.raises(ValueError, match="expected a JSON list"):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="expected a JSON list"):
        main([*argv, "--debug"])  # also after the subcommand


def test_serve_an_empty_run_directory(tmp_path):
    p, secs = _lumo("serve", "--run", str(tmp_path))
    _one_line_error(p, secs, "token-LM run", str(tmp_path), "no config.yaml and export/", "lumo train token-lm")
