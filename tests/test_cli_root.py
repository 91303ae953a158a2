"""The console script's root group: --help and --version work without importing stages."""

import subprocess
import sys

from click.testing import CliRunner

from cxrfair import __version__
from cxrfair.cli import COMMANDS, main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_every_command():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_help_does_not_import_torch_or_jax():
    code = "import sys; from cxrfair.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
