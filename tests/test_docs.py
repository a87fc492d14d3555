"""The documentation stays navigable and current: every relative link (and
``#section``) resolves, the README links every page of docs/ and stays short,
and docs/stages.md mentions every option of every stage."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "DEVELOPERS.md", ROOT / "data" / "README.md", *(ROOT / "docs").glob("*.md")])
# Pages written on other branches: a link to them is accepted while they are absent.
PENDING = {"docs/security.md", "docs/scale.md"}
STAGES = ("prepare", "extract", "graph", "anchors", "diffuse", "mine", "finetune", "whiten", "evaluate",
          "proxy_retrieval", "prefix", "report", "pool_figure")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """``text`` without fenced or indented code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return re.sub(r"`[^`]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(match) for match in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}


def relative_links(page: Path) -> list[tuple[str, str]]:
    """``(target path relative to the repository, anchor)`` of every in-repository link of ``page``."""
    links = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page.resolve()
        links.append((resolved.relative_to(ROOT).as_posix(), anchor))
    return links


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_link_resolves(page):
    for target, anchor in relative_links(page):
        if target in PENDING and not (ROOT / target).exists():
            continue
        assert (ROOT / target).exists(), f"{page.name}: link to missing {target}"
        if anchor:
            assert anchor in anchors(ROOT / target), f"{page.name}: no section #{anchor} in {target}"


def test_readme_is_short_and_links_every_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 220
    linked = {target for target, _ in relative_links(readme)}
    pages = {page.relative_to(ROOT).as_posix() for page in (ROOT / "docs").glob("*.md")} | PENDING
    assert pages <= linked, f"README does not link {sorted(pages - linked)}"


def stage_section(text: str, stage: str) -> str:
    """The ``## <stage>`` section of docs/stages.md (report and pool_figure: the grid's section)."""
    heading = f"## {stage}\n" if stage not in ("report", "pool_figure") else "## The Table 1 grid"
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.mark.parametrize("stage", STAGES)
def test_stages_page_names_every_option(stage):
    section = stage_section((ROOT / "docs" / "stages.md").read_text(), stage)
    command = importlib.import_module(f"stages.{stage}").main
    for param in command.params:
        option = param.opts[0].lstrip("-")
        named = re.search(rf"`(--)?{re.escape(option)}[`\s]", section)
        assert named, f"docs/stages.md, {stage}: no {param.opts[0]}"
