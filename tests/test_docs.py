"""README.md and docs/*.md: every link and image points at a file of the repository, the README stays a
newcomer's five minutes, and neither tells the project's history (git log does)."""
import json
import re

import pytest

from common import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](image)
HISTORY = re.compile(r"previous (version|README|run)|earlier (run|version)|before this round|this version|"
                     r"\bcommit [0-9a-f]{7,}|\(was |as before\b", re.IGNORECASE)


def test_the_pages_exist():
    assert {p.name for p in PAGES} >= {"README.md", "training.md", "deepspeed.md", "fsdp.md", "other-models.md",
                                       "measurements.md"}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_point_at_files_that_exist(page):
    targets = [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+://|#|mailto:", t)]
    missing = [t for t in targets if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name} links to {missing}"


def test_the_readme_shows_the_figure_and_is_short():
    text = (REPO / "README.md").read_text()
    images = [t for t in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)]
    assert images and all((REPO / image).stat().st_size > 10_000 for image in images)
    lines = text.splitlines()
    assert len(lines) <= 300
    assert any("pip install -r requirements.txt" in line for line in lines[:40])


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_no_history_in_the_docs(page):
    found = [line.strip() for line in page.read_text().splitlines() if HISTORY.search(line)]
    assert not found, f"{page.name} tells history (git log does): {found}"


def test_the_optimizer_files_keep_to_100_columns():
    """The files a reader holds against the paper (the rest of the repository: ruff's 120)."""
    long = {p.name: [i + 1 for i, line in enumerate(p.read_text().splitlines()) if len(line) > 100]
            for p in sorted(REPO.glob("sinkgd*.py"))}
    assert len(long) == 5 and not any(long.values()), long


def test_the_readme_result_is_the_committed_run():
    """The README's numbers are those of docs/compare_c4.json, the summary of the run that drew docs/compare_c4.png:
    the final losses, the effective throughputs, and the gap to each baseline at each horizon."""
    s = json.loads((REPO / "docs" / "compare_c4.json").read_text())
    text = (REPO / "README.md").read_text()
    pm = lambda d, f=".3f": f"{d['mean']:{f}} ± {d['std']:{f}}"
    numbers = [pm(s["sinkgd_final_val_loss"]), f"{s['max_steps']} steps of"]
    for b in s["baselines"].values():
        numbers += [pm(b["final_val_loss"]), pm(b["effective_throughput_ratio"], ".2f") + "x"]
        numbers += [f"{pm(h['gap'])} ({h['sinkgd_lower_in']} of {h['gap']['n']}" for h in b["horizon"].values()]
    assert len(numbers) == 2 + 2 * (2 + 3) and not [n for n in numbers if n not in text], numbers
