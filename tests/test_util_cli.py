"""util/cli.py: every entry point answers --help with grouped, documented flags; launch()'s exit codes."""
import argparse

import pytest
import torch
import torch.distributed as dist

import main_finetune
import main_knn
import main_linprobe
import main_pretrain
import submitit_pretrain
import util.cli as cli
from helpers import free_port
from util.errors import NonFiniteLossError, Preempted, UserError

ENTRY_POINTS = [main_pretrain, main_finetune, main_linprobe]


def _flag_actions(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("module", ENTRY_POINTS, ids=lambda m: m.__name__)
def test_help_exits_0_and_every_flag_is_documented(module, capsys):
    parser = cli.command_line_parser(module.get_args_parser())
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([flag])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage:")
    undocumented = [a.option_strings[0] for a in _flag_actions(module.get_args_parser()) if not (a.help or "").strip()]
    assert undocumented == []
    # grouped as the reference's comments group them, ours last
    groups = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups[:4] == ["options", "training parameters", "model parameters", "optimizer parameters"]
    assert groups[-3:] == ["data parameters", "distributed parameters", "ours"]
    # defaults shown: a value flag, an empty-string flag
    assert "epochs of the schedule (default: " in out and "(default: '')" in out


@pytest.mark.parametrize("module", [*ENTRY_POINTS, main_knn, submitit_pretrain], ids=lambda m: m.__name__)
def test_local_rank_as_torch_distributed_launch_passes_it(module):
    parse = module.parse_args if module is submitit_pretrain else \
        cli.command_line_parser(module.get_args_parser()).parse_args
    assert parse(["--local-rank=1"]).local_rank == 1  # python -m torch.distributed.launch
    assert parse(["--local_rank", "2"]).local_rank == 2  # the reference's spelling


@pytest.mark.parametrize("module", ENTRY_POINTS, ids=lambda m: m.__name__)
def test_get_args_parser_stays_a_parent_parser(module):
    parser = module.get_args_parser()
    assert not any("-h" in a.option_strings for a in parser._actions)  # the reference's add_help=False
    child = argparse.ArgumentParser(parents=[parser])  # as a launcher builds it
    assert child.parse_args(["--epochs", "3"]).epochs == 3


def test_launcher_help_shows_its_flags_and_the_entry_points(capsys):
    with pytest.raises(SystemExit) as e:
        submitit_pretrain.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "launcher parameters:" in out and "--ngpus NGPUS" in out and "--mask_ratio" in out


def _raise(exc):
    def main(_args):
        raise exc
    return main


@pytest.mark.parametrize("exc, code, expected", [
    (UserError("--flag is wrong; use another"), 2, "error: --flag is wrong; use another"),
    (NonFiniteLossError(3, 7, 1e-3, float("nan")), 1, "error: loss is nan at epoch 3, step 7"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (Preempted(15, 2, 7), 143, "stopped by SIGTERM at epoch 2, step 7: checkpoint-last.pth holds this position"),
    (Preempted(10, 0, 3, saved=False), 138, "stopped by SIGUSR1 at epoch 0, step 3: nothing was saved"),
])
def test_launch_exit_codes_for_known_failures(exc, code, expected, capsys):
    assert cli.launch(_raise(exc), None) == code
    err = capsys.readouterr().err
    assert err.startswith(expected) and "Traceback" not in err


def test_launch_reports_a_bug_with_its_traceback_and_leaves_the_process_group(capsys):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert cli.launch(_raise(ZeroDivisionError("division by zero")), None) == 1
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: division by zero" in err


def test_launch_success_leaves_the_process_group_too():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    assert cli.launch(lambda _: torch.zeros(1), None) == 0
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------
# --help of every script, as `python SCRIPT --help` runs it (its __main__ block, in this process)

def _scripts():
    import glob
    import os

    from helpers import ROOT
    files = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "demo", "*.py")))
    return [os.path.relpath(f, ROOT) for f in files if 'if __name__ == "__main__":' in open(f).read()]


SCRIPTS = _scripts()


def _help_sections(body):
    """{group title: {invocation ('--flag METAVAR, --alias METAVAR'): its help}} of a --help text after the usage."""
    sections, title, lines = {}, None, []
    for line in [*body.splitlines(), "end:"]:
        if line.endswith(":") and not line.startswith(" "):
            if title is not None:
                while lines and not lines[-1]:
                    lines.pop()
                if "" in lines:  # a group description, then a blank line, then the entries
                    lines = lines[lines.index("") + 1:]
                sections[title] = _entries(lines)
            title, lines = line[:-1], []
        else:
            lines.append(line)
    return sections


def _entries(lines):
    entries, current = {}, None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if indent == 2:
            current = line.strip().split("  ")[0]
            entries[current] = line.strip()[len(current):]
        elif current is not None and indent >= 4:
            entries[current] += " " + line.strip()
    return entries


def _required_flags(usage):
    """The flags the usage line shows outside brackets (argparse's required options)."""
    depth, required = 0, set()
    for token in usage.replace("[", " [ ").replace("]", " ] ").split():
        depth += token == "["
        depth -= token == "]"
        if depth == 0 and token.startswith("-"):
            required.add(token)
    return required


def test_every_script_is_covered():
    assert {"main_pretrain.py", "main_finetune.py", "main_linprobe.py", "main_knn.py", "export.py", "benchmark.py",
            "submitit_pretrain.py", "submitit_finetune.py", "submitit_linprobe.py", "demo/quickstart.py",
            "demo/mae_visualize.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_help_exits_0_with_groups_and_defaults(script, monkeypatch, capsys):
    import os
    import runpy

    from helpers import ROOT
    path = os.path.join(ROOT, script)
    monkeypatch.setattr("sys.argv", [path, "--help"])
    monkeypatch.syspath_prepend(os.path.dirname(path))  # as python puts a script's folder first
    with pytest.raises(SystemExit) as e:
        runpy.run_path(path, run_name="__main__")
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    usage, body = out.split("\n\n", 1)
    sections = _help_sections(body)
    # the flags are grouped: the untitled 'options' section holds only -h / --help
    assert list(sections)[0] == "options" and list(sections["options"]) == ["-h, --help"], list(sections)
    entries = {flag: text for section in list(sections.values())[1:] for flag, text in section.items()}
    assert len(entries) >= 4
    undocumented = [flag for flag, text in entries.items() if not text.strip()]
    assert undocumented == []
    required = _required_flags(usage)
    # every flag that takes a value states its default (on/off switches say what they change)
    no_default = [flag for flag, text in entries.items()
                  if flag.startswith("-") and any(" " in name for name in flag.split(", "))
                  and flag.split()[0] not in required
                  and "default:" not in " ".join(text.lower().split())]
    assert no_default == []
