"""The ``cxrfair`` console script: one click group whose subcommands live with their stage.

Subcommands are imported lazily so ``cxrfair --help`` stays fast and never imports torch or jax.
Every stage's CLI module imports only click at module level; the library code it calls is
imported inside the command.
"""

from __future__ import annotations

import errno
import gc
import importlib
import os
import signal
import sys
import threading
import warnings

import click

from cxrfair import __version__
from cxrfair.errors import CxrfairError, CxrfairWarning

# name -> "module:attribute" of a click command or group; order is the order shown in --help.
COMMANDS = {
    "cohort": ("cxrfair.extract.cohort_cli:cohort", "Build a cohort from NIH, CheXpert, MIMIC-CXR or a CSV; or synthesise data."),
    "models": ("cxrfair.extract.cli:models", "List the foundation models in the registry."),
    "weights": ("cxrfair.extract.cli:weights", "Download a model's released weights (or say how, offline)."),
    "extract": ("cxrfair.extract.cli:extract", "Embed a cohort with one model into an HDF5 cache (resumable)."),
    "probe": ("cxrfair.probe.cli:probe", "Zero-shot, linear and MLP probes on cached embeddings (JAX)."),
    "embeddings": ("cxrfair.probe.embeddings.cli:embeddings", "Attribute leakage and geometry of cached image embeddings."),
    "finetune": ("cxrfair.finetune.cli:finetune", "LoRA or full fine-tuning of a model's image encoder."),
    "postprocess": ("cxrfair.analysis.postprocess_cli:postprocess", "Group thresholds / class offsets fitted on validation: a fairer run from any run."),
    "analyze": ("cxrfair.analysis.cli:analyze", "Metrics with bootstrap intervals, figures and a report from runs."),
    "run": ("cxrfair.pipeline_cli:run", "Run a whole experiment from a TOML config, skipping finished steps."),
    "demo": ("cxrfair.pipeline_cli:demo", "The whole pipeline on synthetic data with a tiny model (minutes, CPU)."),
}


class LazyGroup(click.Group):
    """A group that imports each subcommand on first use and turns CxrfairError into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        target, _ = COMMANDS[name]
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table, so --help does not import every stage.
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        _INTERRUPTS.update(seen=0, deferred=False)
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _on_sigint)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", CxrfairWarning)
                warnings.showwarning = _show_warning
                result = super().invoke(ctx)
        except CxrfairError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            line = os_error_line(e)
            if line is None:
                raise
            raise click.ClickException(line) from None
        except KeyboardInterrupt:
            _exit_interrupted()
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, previous)
        if _INTERRUPTS["seen"]:
            # A Ctrl-C that library code swallowed (a gc callback, a __del__) still ends the command as interrupted.
            _exit_interrupted()
        return result


# errno -> (what happened, the fix) for the OS errors a user fixes by choosing another place to write.
OS_ERRORS = {
    errno.ENOSPC: ("disk full", "free space or choose another --out"),
    errno.EDQUOT: ("disk quota exceeded", "free space or choose another --out"),
    errno.EROFS: ("read-only file system", "choose another --out"),
    errno.EACCES: ("permission denied", "fix the permissions or choose another path"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another path"),
}


def os_error_line(e: OSError) -> str | None:
    """The one line for an OSError the user can fix (full disk, read-only, no permission), else None."""
    if e.errno not in OS_ERRORS:
        return None
    what, fix = OS_ERRORS[e.errno]
    where = e.filename if e.filename is not None else "writing an output"
    return f"{where}: {what}; {fix}"


# Ctrl-C. Python raises KeyboardInterrupt wherever the main thread happens to be; inside a gc
# callback (JAX registers one) or a __del__ it is printed as "Exception ignored" and the command
# goes on. So the handler defers the interrupt out of such frames, and a command that returns
# after a swallowed Ctrl-C still exits 130. A second Ctrl-C leaves at once.
_INTERRUPTS = {"seen": 0, "deferred": False}


def _swallowing(frame) -> bool:
    """True if ``frame`` runs inside a gc callback or a ``__del__``, where an exception is swallowed."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _resend() -> None:
    _INTERRUPTS["deferred"] = True
    os.kill(os.getpid(), signal.SIGINT)


def _on_sigint(signum, frame) -> None:
    if _INTERRUPTS["deferred"]:
        _INTERRUPTS["deferred"] = False
    else:
        _INTERRUPTS["seen"] += 1
    if _INTERRUPTS["seen"] > 1:
        _exit_interrupted()
    if _swallowing(frame):
        timer = threading.Timer(0.05, _resend)
        timer.daemon = True
        timer.start()
        return
    raise KeyboardInterrupt


def _exit_interrupted() -> None:
    """Say so and exit 130. Atomic outputs were already removed while the exception unwound;
    os._exit skips interpreter teardown, where XLA / torch threads have crashed the process (139)."""
    click.echo("\nInterrupted (Ctrl-C); no half-written output was kept", err=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """CxrfairWarning as one ``Warning: ...`` line on stderr (no file and line); others as Python shows them."""
    if issubclass(category, CxrfairWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cxrfair")
def main() -> None:
    """Measure how fair CLIP-style foundation models are on chest X-rays.

    Typical flow: cohort build -> extract (per model) -> probe / finetune -> analyze.
    `cxrfair demo` runs all of it on synthetic data; `cxrfair run CONFIG` runs an experiment.
    """
