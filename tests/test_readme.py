"""README.md against the code: what a new user copies from it must exist, and what the code
accepts must be in it — every config key of its YAML snippets, every flag of its commands, every
registered name and strategy option (a renamed key or a new flag that the README misses fails
here, not in a user's first hour)."""

from __future__ import annotations

import argparse
import re
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from evomerge.cli import build_parser
from evomerge.config import PopulationConfig, RunConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _models(annotation) -> list[type[BaseModel]]:
    """The config models an annotation holds (``X | None``, ``list[X]``, ``dict[str, X]``)."""
    found, stack = [], [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            found.append(a)
        else:
            stack.extend(typing.get_args(a))
    return found


def _unknown_keys(value, model: type[BaseModel], where: str) -> list[str]:
    """Keys of a snippet's mapping (and of the mappings nested in it) that ``model`` lacks."""
    if isinstance(value, list):
        return [bad for i, item in enumerate(value) for bad in _unknown_keys(item, model, f"{where}.{i}")]
    if not isinstance(value, dict):
        return []  # a shorthand (an expert's path as a string)
    fields = model.model_fields
    unknown = []
    for key, item in value.items():
        if key not in fields:
            unknown.append(f"{where}.{key}".lstrip("."))
            continue
        nested = _models(fields[key].annotation)
        if isinstance(item, dict) and not nested:
            continue  # options, fixed values, bounds: the registries check those
        for sub in nested:
            if isinstance(item, dict) and typing.get_origin(fields[key].annotation) is dict:
                unknown += [bad for k, v in item.items() for bad in _unknown_keys(v, sub, f"{where}.{key}.{k}")]
            else:
                unknown += _unknown_keys(item, sub, f"{where}.{key}")
    return unknown


def _yaml_snippets() -> list[tuple[int, dict]]:
    snippets = []
    for match in re.finditer(r"```yaml\n(.*?)```", README, re.S):
        data = yaml.safe_load(match.group(1))
        if isinstance(data, dict) and set(data) & set(RunConfig.model_fields):  # a run config, or part of one
            snippets.append((README[: match.start()].count("\n") + 1, data))
    return snippets


def test_the_readme_has_config_snippets():
    assert len(_yaml_snippets()) >= 10


@pytest.mark.parametrize("line,snippet", _yaml_snippets(), ids=lambda x: f"line{x}" if isinstance(x, int) else "")
def test_every_key_of_a_config_snippet_is_a_config_field(line, snippet):
    assert _unknown_keys(snippet, RunConfig, "") == [], f"README.md line {line}"


def test_every_strategy_option_in_a_snippet_is_one_the_strategy_takes():
    from evomerge.strategies import STRATEGIES

    for line, snippet in _yaml_snippets():
        for pop in snippet.get("populations", []):
            strategy = pop.get("strategy", PopulationConfig.model_fields["strategy"].default)
            unknown = set(pop.get("options", {})) - set(STRATEGIES[strategy].Options.model_fields)
            assert not unknown, f"README.md line {line}: {strategy} has no options {sorted(unknown)}"


def test_every_config_field_is_named_in_the_readme():
    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            if not re.search(rf"(`|\b){re.escape(name)}(:|`)", README):
                missing.append(prefix + name)
            for sub in _models(field.annotation):
                missing += walk(sub, f"{prefix}{name}.")
        return missing

    assert walk(RunConfig, "") == []


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_of_every_command_is_in_the_readme():
    for name, parser in _subcommands().items():
        assert f"evomerge {name}" in README, name
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}" in README or f" {flag}" in README, f"evomerge {name} {flag}"


def test_every_flag_the_readme_gives_a_command_exists():
    commands = _subcommands()
    spans = re.findall(r"`([^`\n]+)`", README) + re.findall(r"```(?:bash)?\n(.*?)```", README, re.S)
    checked = 0
    for span in spans:
        for line in span.splitlines():
            for match in re.finditer(r"evomerge (\w+)((?: [^|;&>]*)?)", line):
                command, rest = match.groups()
                if command not in commands:
                    continue
                flags = {f for a in commands[command]._actions for f in a.option_strings}
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                    assert flag in flags, f"README: evomerge {command} {flag}: no such flag ({line.strip()})"
                    checked += 1
    assert checked >= 10


def test_every_registered_name_and_strategy_option_is_in_the_readme():
    from evomerge.fitness import FITNESS_FUNCTIONS
    from evomerge.merge import MERGE_METHODS
    from evomerge.strategies import STRATEGIES

    for registry in (FITNESS_FUNCTIONS, MERGE_METHODS, STRATEGIES):
        assert [name for name in registry if f"`{name}`" not in README] == []
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| [^|]+ \| (.+) \|$", README, re.M)}
    for name, cls in STRATEGIES.items():
        missing = [option for option in cls.Options.model_fields if f"`{option}`" not in rows[name]]
        assert missing == [], f"README's strategy table, {name}: {missing}"


ROOT = Path(__file__).resolve().parents[1]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_every_link_of_the_readme_leads_somewhere():
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if path and not (ROOT / path).exists():
            broken.append(target)
        elif anchor and (path == "" or path.endswith(".md")):
            if anchor not in _anchors(README if not path else (ROOT / path).read_text(encoding="utf-8")):
                broken.append(target)
    assert broken == []


def test_every_make_target_the_readme_names_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README))
    assert named and named <= targets, named - targets


def test_every_extra_the_readme_installs_exists_and_each_is_named():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {extra for group in re.findall(r"(?:evomerge|\.)\[([a-z,]+)\]", README) for extra in group.split(",")}
    assert named <= extras, named - extras
    assert [extra for extra in extras if f"`{extra}`" not in README and extra not in named] == []


def test_the_black_box_plugin_snippet_scores_through_a_served_model(tmp_path, monkeypatch):
    """The README's async plugin, resolved as a black-box run resolves it, on a stand-in for the
    served candidate that answers log-likelihoods as ``ServedModel`` does."""
    import asyncio

    from evomerge.fitness import resolve_blackbox_fitness, scores_and_metrics, with_options
    from evomerge.fitness.blackbox import Loglikelihood

    snippet = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "my_pkg/served.py" in b)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "served.py").write_text(snippet)
    monkeypatch.syspath_prepend(str(tmp_path))

    class Served:
        async def loglikelihood(self, context: str, continuation: str) -> Loglikelihood:
            return Loglikelihood(logprob=-1.0, tokens=2, is_greedy=continuation == "yes")

    try:
        fn = with_options(resolve_blackbox_fitness("my_pkg.served:short_answers"), "my_pkg.served:short_answers", {})
        examples = [{"prompt": "q1", "target": "yes"}, {"prompt": "q2", "target": "no"}]
        scores, _ = scores_and_metrics(asyncio.run(fn(Served(), examples)), 2, "short_answers")
    finally:  # another test may write a my_pkg of its own
        for name in ("my_pkg.served", "my_pkg"):
            sys.modules.pop(name, None)
    assert scores.tolist() == [1.0, 0.0]


def test_the_racing_snippet_shows_the_defaults_it_says_it_shows():
    """The README says of its racing block: "These values are the defaults"."""
    from evomerge.config import RacingConfig

    assert "These values are the defaults" in README
    racing = next(s["fitness"]["racing"] for _, s in _yaml_snippets() if "racing" in s.get("fitness", {}))
    assert RacingConfig(**racing) == RacingConfig()
    assert set(racing) == set(RacingConfig.model_fields)


def test_the_workers_snippet_shows_the_defaults_but_for_count_and_address():
    from evomerge.config import WorkersConfig

    workers = next(s["workers"] for _, s in _yaml_snippets() if "workers" in s)
    shown = WorkersConfig(**workers).model_dump(exclude={"count", "address"})
    assert shown == WorkersConfig().model_dump(exclude={"count", "address"})
