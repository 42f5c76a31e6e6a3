"""The documentation's code blocks, by the check each names (`<!-- check: KIND -->` on the line
before its fence): read by .ci/check-docs and by the end-to-end suite's workloads, which run the
example pods. src/doc_blocks.rs reads the same blocks for the unit tests."""
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Block:
    place: str      # "docs/src/dra.md:12", where the fence opens
    language: str
    check: str | None
    text: str


def files() -> list[Path]:
    """README.md, BENCHMARKS.md and every page of the book, relative to the repository."""
    return [Path("README.md"), Path("BENCHMARKS.md")] + sorted(
        p.relative_to(ROOT) for p in (ROOT / "docs/src").glob("*.md"))


def blocks_of(name: str, text: str) -> list[Block]:
    out, lines, previous, i = [], text.split("\n"), "", 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith("```"):
            previous, i = line, i + 1
            continue
        indent = len(line) - len(stripped)
        marker = previous.strip()
        check = marker[len("<!-- check: "):-len(" -->")] if (
            marker.startswith("<!-- check: ") and marker.endswith(" -->")) else None
        opened, body, i = i + 1, [], i + 1
        while i < len(lines) and not lines[i].lstrip().startswith("```"):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i].lstrip())
            i += 1
        out.append(Block(f"{name}:{opened}", stripped[3:].strip(), check, "\n".join(body) + "\n"))
        previous, i = "", i + 1
    return out


def blocks() -> list[Block]:
    return [b for f in files() for b in blocks_of(str(f), (ROOT / f).read_text())]


def checked(check: str) -> list[Block]:
    return [b for b in blocks() if b.check == check]
