"""Optional dependencies: whether one is installed, and the one line that says how to install it.

Checked without importing the package (importing NVIDIA DALI takes seconds), so that a run that does not use
it never loads it.
"""
import importlib.util

import torch

from util.errors import UserError


def require_package(module: str, what: str, extra: str = "requirements-data.txt") -> None:
    """A one-line error naming the install when an optional package (of requirements-data.txt, or `extra`) is
    missing."""
    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the {module} package, which is not installed: pip install -r {extra}")


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def install_command() -> str:
    """The pip command for the DALI build that matches torch's CUDA (cuda130 for a CPU-only torch)."""
    major = (torch.version.cuda or "13").split(".")[0]
    return f"pip install nvidia-dali-cuda{major}0"


def require_dali() -> None:
    """Raise a one-line UserError naming the install command when DALI is missing."""
    if not dali_available():
        raise UserError(f"--data_loader dali needs NVIDIA DALI, which is not installed: run `{install_command()}` "
                        f"(or pip install -r requirements-dali.txt), or use --data_loader torch")
