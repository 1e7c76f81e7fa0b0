"""The fine-seg command line."""
import subprocess
import sys

from FINESegmentationLib.cli import main


def test_help_lists_the_subcommands(capsys):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "configs" in out and "models" in out, "fine-seg --help names its subcommands"


def test_installed_console_script_answers_help():
    proc = subprocess.run([sys.executable, "-m", "FINESegmentationLib.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "fine-seg" in proc.stdout, "python -m FINESegmentationLib.cli --help works"


def test_configs_reports_parameters_and_eq2(capsys):
    assert main(["configs", "fine-tiny", "--forward"]) == 0
    out = capsys.readouterr().out
    assert "fine-tiny" in out and "1x9x32x64x64" in out, "configs --forward runs a forward pass and shows its output shape"
