"""The docs hold up: README.md is a front page of at most 15 KB with the two commands (.ci/run runs the second);
every relative link in README.md and docs/*.md reaches a file (and a heading, for an anchor); the methods and
loaders tables name every method and backend; every command in a bash block names a script or module that
exists, and the options it gives train.py and eval.py are theirs."""

import re
import shlex
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 15_000  # bytes
SETUP = "./setup.sh && .venv/bin/python train.py --loader dali"
TESTS = "./setup.sh && .venv/bin/python -m pytest -q tests"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """`text` without its fenced code blocks and inline code spans (a link's text may hold code: kept empty)."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in `path`; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S).splitlines():
        if m := re.match(r"#{1,6} +(.+?) *#*$", line):
            base = slug(m[1])
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(path: Path) -> tuple[int, list[str]]:
    """(relative links in `path`, those whose file or anchor does not exist, as `path: target`)."""
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", prose(path.read_text()))
    relative = [t for t in links if not re.match(r"[a-z]+:", t)]
    broken = []
    for target in relative:
        file, _, anchor = target.partition("#")
        goal = (path.parent / file).resolve() if file else path
        if not goal.exists() or (anchor and (goal.suffix != ".md" or anchor not in anchors(goal))):
            broken.append(f"{path.name}: {target}")
    return len(relative), broken


def test_the_readme_is_a_front_page():
    assert (ROOT / "README.md").stat().st_size <= README_LIMIT


def test_the_two_commands_are_the_readmes_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    two = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert f"```bash\n   {SETUP}\n   ```" in two and f"```bash\n   {TESTS}\n   ```" in two
    assert two.index(SETUP) < two.index(TESTS)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == TESTS


def test_every_relative_link_resolves():
    counts, broken = zip(*(broken_links(path) for path in pages()))
    assert sum(counts) > 20 and not sum(broken, []), "\n".join(sum(broken, []))


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading, twice\n\n## A `code` heading, twice\n")
    page = tmp_path / "page.md"
    good = "[a](other.md) [b](other.md#other-page) [c](other.md#a-code-heading-twice-1) [d](#here) `[e](no.md)`"
    bad = "[f](missing.md) [g](other.md#nowhere) [h](#nor-here) [i](other.md#a-code-heading-twice-2)"
    page.write_text(f"# Here\n\n{good}\n\n{bad}\n\n```\n[j](inside-code.md)\n```\n")
    count, broken = broken_links(page)
    assert count == 8
    expected = ["missing.md", "other.md#nowhere", "#nor-here", "other.md#a-code-heading-twice-2"]
    assert [b.split(": ")[1] for b in broken] == expected


def choices(command: click.Command, option: str) -> list[str]:
    (param,) = [p for p in command.params if option in p.opts]
    return list(param.type.choices)


def test_the_readme_tables_name_every_method_and_loader():
    import train

    rows = re.findall(r"^\| `([\w-]+)`", (ROOT / "README.md").read_text(), flags=re.M)
    methods, loaders = choices(train.main, "--method"), choices(train.main, "--loader")
    assert len(methods) >= 5 and len(loaders) >= 3 and set(methods + loaders) <= set(rows)


def test_the_layout_names_every_module():
    """docs/architecture.md's layout block names every file of pipeline/, model/ and run/ (as NAME.py)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    files = [p for package in ("pipeline", "model", "run") for p in sorted((ROOT / package).rglob("*.py"))]
    named = set(re.findall(r"(?<![\w/])(\w+\.py)\b", block))
    unnamed = [str(p.relative_to(ROOT)) for p in files if p.name != "__init__.py" and p.name not in named]
    assert len(files) > 30 and not unnamed, unnamed


def test_the_readmes_layout_names_every_room_of_run():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    rooms = block.split("\nrun/", 1)[1].split("\ntrain.py", 1)[0]
    named = set(re.findall(r"\w+", rooms))
    files = [p.stem for p in sorted((ROOT / "run").glob("*.py")) if p.name != "__init__.py"]
    assert len(files) > 5 and not [f for f in files if f not in named]


def commands() -> list[tuple[Path, list[str]]]:
    """(page, words) of every command line in the pages' bash blocks, continuation lines joined."""
    found = []
    for path in pages():
        for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()  # a comment after the command
                if line and not line.startswith("#"):
                    found.append((path, shlex.split(line.replace("$", ""))))
    return found


def test_every_documented_script_and_module_exists():
    named = []
    for path, words in commands():
        for i, word in enumerate(words):
            if word == "-m" and i + 1 < len(words):
                module = words[i + 1]
                if module not in ("pytest",):
                    named.append((path, module, ROOT / (module.replace(".", "/") + ".py")))
            elif word.endswith(".py") and not word.startswith("-"):
                named.append((path, word, ROOT / word))
    missing = [f"{path.name}: {name}" for path, name, file in named if not file.exists()]
    assert len(named) > 20 and not missing, missing


def options_of(command: click.Command) -> set[str]:
    params = command.get_params(click.Context(command))  # --help included
    return {name for param in params for name in [*param.opts, *param.secondary_opts]}


def test_every_documented_option_of_train_and_eval_exists():
    import eval as evaluation
    import train

    given = []
    for path, words in commands():
        for script in ("train.py", "eval.py"):
            if script in words:
                rest = words[words.index(script) + 1 :]
                command = train.main
                if script == "eval.py":
                    command = evaluation.main.commands[rest[0]]
                flags = [w.split("=")[0] for w in rest if w.startswith("--")]
                given += [(path, script, flag, options_of(command)) for flag in flags]
    unknown = [f"{path.name}: {script} {flag}" for path, script, flag, known in given if flag not in known]
    assert len(given) > 40 and not unknown, unknown


def test_every_page_has_its_commands():
    with_commands = {path for path, _ in commands()}
    assert [path.name for path in pages() if path not in with_commands] == []
