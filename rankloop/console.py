"""What every `rankloop` subcommand shares: the settings or a clean exit, and errors said the same way."""

from __future__ import annotations

import os

import typer
from rich.console import Console

from deploy.settings import Settings, SettingsError, cpu_list, load_settings

errors = Console(stderr=True)


def settings_or_exit() -> Settings:
    """The process's settings, or exit with code 2 and the problem named."""
    try:
        return load_settings()
    except SettingsError as exc:
        errors.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc


def training_settings_or_exit() -> Settings:
    """The settings, with this process held to the learner's cores (`learn_cpus`) and PyTorch to its thread budget
    (`learn_threads`)."""
    settings = settings_or_exit()
    if settings.learn_cpus is not None:
        cores = cpu_list(settings.learn_cpus) & os.sched_getaffinity(0)
        if not cores:
            raise fail(
                f"RANKLOOP_LEARN_CPUS={settings.learn_cpus} names none of the cores this process may use "
                f"({sorted(os.sched_getaffinity(0))})",
                2,
            )
        os.sched_setaffinity(0, cores)
    import torch

    torch.set_num_threads(settings.learn_threads or torch.get_num_threads())
    return settings


def fail(problem: object, code: int = 1) -> typer.Exit:
    """Print `problem` as an error; return the Exit for the caller to raise."""
    errors.print(f"[red]error:[/] {problem}")
    return typer.Exit(code)
