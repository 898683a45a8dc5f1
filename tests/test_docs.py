"""The README is the front door and docs/ the manual: the README stays short, every relative link in them leads to a
file of the repository, every command of `prefuse --help` has its line in the README's command table, every
registered objective has a method page, and nothing in the package or the docs points outside the repository."""
import re
from pathlib import Path

import pytest

import prefuse
from prefuse.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 220
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
OUTSIDE = ("ALGORITHMS.md", "../shared", "shared/DESIGN.md")


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def readme_commands() -> set[str]:
    """The first cell of each row of the README's command table (`prefuse <command>`)."""
    section = README.read_text().split("## Commands", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `prefuse ([a-z][a-z-]*)` \|", section, flags=re.M))


def help_commands(capsys) -> set[str]:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    return set(re.search(r"\{([a-z,-]+)\}", usage).group(1).split(","))


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    assert (DOCS / "index.md").is_file()


def test_every_relative_link_leads_to_a_file_of_the_repository():
    broken = []
    for md in markdown_files():
        for target in relative_links(md.read_text()):
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or ROOT not in path.parents:
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_docs_link_their_pages():
    """Every page under docs/ is reached from the README through links (no orphan page)."""
    seen, todo = set(), [README.resolve()]
    while todo:
        md = todo.pop()
        if md in seen:
            continue
        seen.add(md)
        for target in relative_links(md.read_text()):
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if path.suffix == ".md" and path.is_file():
                todo.append(path)
    orphans = [str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md") if p.resolve() not in seen]
    assert not orphans, orphans


def test_every_command_has_its_line_in_the_readme(capsys):
    commands = help_commands(capsys)
    assert {"train", "demo", "bench"} <= commands
    missing = commands - readme_commands()
    assert not missing, f"commands of prefuse --help missing from the README's table: {sorted(missing)}"


def test_every_registered_objective_has_a_method_page():
    pages = "\n".join(p.read_text() for p in (DOCS / "methods").glob("*.md"))
    missing = [name for name in prefuse.list_objectives() if f"`{name}`" not in pages]
    assert not missing, f"objectives no docs/methods page names: {missing}"


def test_nothing_points_outside_the_repository():
    files = [p for p in (ROOT / "prefuse").rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".txt", ".json")]
    offenders = [f"{p.relative_to(ROOT)}: {s}" for p in files + markdown_files() for s in OUTSIDE
                 if s in p.read_text(errors="replace")]
    assert not offenders, offenders
