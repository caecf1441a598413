"""Helpers for end-to-end tests: run an entry point as a subprocess, read its outputs."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc, script, *args, timeout=240):
    """Run a script under torchrun on this machine (CPU, gloo)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def read_log(output_dir):
    """log.txt as a list of dicts."""
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f if line.strip()]


TINY_PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--batch_size", "4",
                 "--warmup_epochs", "1", "--num_workers", "0", "--device", "cpu", "--print_freq", "2"]
