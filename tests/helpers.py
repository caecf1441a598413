"""Helpers for end-to-end tests: run an entry point in this process or as a subprocess, read its outputs."""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_entry(module, *args, check=True):
    """Run an entry point's command line (`python main_x.py args...`) in this process.

    The same parser and `cli.launch` as the script's __main__, without paying for a new interpreter;
    returns a CompletedProcess with the exit code and the captured stdout / stderr.
    """
    import util.cli as cli

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.launch(module.main, cli.command_line_parser(module.get_args_parser()).parse_args(argv))
    proc = subprocess.CompletedProcess([module.__name__, *argv], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{module.__name__} exited {code}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def run_script(script, *args, timeout=240, env=None, check=True, cwd=ROOT):
    """Run `python script args...` from the repo root; return the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def one_error_line(err):
    """The single `error:` line of a failed run's stderr (and no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc, script, *args, timeout=240, launcher="torch.distributed.run"):
    """Run a script under torchrun on this machine (CPU, gloo); launcher="torch.distributed.launch" is the
    reference's launcher, which passes --local-rank=N to the script."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", launcher, "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def read_log(output_dir, name="log.txt"):
    """log.txt (or another JSON-lines file) as a list of dicts."""
    with open(os.path.join(output_dir, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def load(path):
    """A checkpoint file, loaded safely."""
    return torch.load(path, map_location="cpu", weights_only=True)


TINY_PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "4",
                 "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu", "--print_freq", "2"]
TINY_CLS = ["--model", "vit_tiny_patch16", "--input_size", "32", "--batch_size", "4", "--warmup_epochs", "1",
            "--num_workers", "0", "--device", "cpu", "--print_freq", "2"]


def tiny_net(seed):
    """A three-layer net with a LayerNorm, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def trained_optimizer(model):
    """AdamW after two steps on random data (non-empty state)."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt
