"""`prefuse demo` (what `make demo` runs) trains and reports an improvement; shortened by its own flags."""
from prefuse.cli import main


def test_demo_improves_the_held_out_loss(capsys):
    assert main(["demo", "--steps", "120", "--skip_memory"]) == 0
    out = capsys.readouterr().out
    assert "closed over half the gap" in out and "cross-entropy" in out
