"""Regenerate the config reference table of docs/config.md (between its config:start / config:end
markers) from the pydantic models."""

from pathlib import Path

from compo.config import reference_table

START, END = "<!-- config:start -->", "<!-- config:end -->"


def table() -> str:
    rows = ["| key | default | description |", "|---|---|---|"]
    rows += [f"| `{k}` | `{d}` | {desc} |" for k, d, desc in reference_table()]
    return "\n".join(rows)


def main() -> None:
    path = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    text = path.read_text()
    if "CONFIG_REFERENCE" in text:
        text = text.replace("CONFIG_REFERENCE", f"{START}\n{END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    main()
