"""Recipes as the client takes them: a mapping with `steps` (and `export`), a list of steps, a `JobSpec`, or a
`.yaml`/`.yml`/`.json` file holding one of those, with the same fields as the REST body. The server validates
them (a bad recipe is an `ApiError` with code `validation_error` and every problem in `details`)."""

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from client.errors import INVALID_RECIPE, ApiError

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
Recipe = Mapping[str, Any] | Sequence[Mapping[str, Any]] | BaseModel | str | Path


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; recipes mean the number (YAML 1.2 and JSON agree)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def recipe_body(recipe: Recipe) -> dict[str, Any]:
    """The JSON body fields of a recipe (`steps`, `export`, and `queue`/`model_id` when a file names them)."""
    if isinstance(recipe, Mapping):
        return {str(name): value for name, value in recipe.items()}
    if isinstance(recipe, BaseModel):  # as written: dumped defaults would count as given (the API stores it so)
        return recipe.model_dump(mode="json", exclude_unset=True)
    if isinstance(recipe, str | Path):
        return recipe_body(load_recipe_file(Path(recipe)))
    if isinstance(recipe, Sequence) and all(isinstance(step, Mapping) for step in recipe):
        return {"steps": [dict(step) for step in recipe if isinstance(step, Mapping)]}
    raise ApiError(INVALID_RECIPE, f"a recipe is a mapping with `steps`, a list of steps or a file, not "
                   f"{type(recipe).__name__}")


def load_recipe_file(path: Path) -> dict[str, Any] | list[Any]:
    """A recipe file's content: JSON for `.json`, YAML otherwise."""
    if not path.is_file():
        raise ApiError(INVALID_RECIPE, f"no recipe file {path}", {"path": str(path)})
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)  # noqa: S506 (safe)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ApiError(INVALID_RECIPE, f"cannot read the recipe {path}: {exc}", {"path": str(path)}) from exc
    if isinstance(data, dict) or (isinstance(data, list) and all(isinstance(step, dict) for step in data)):
        return data
    raise ApiError(INVALID_RECIPE, f"the recipe {path} must hold a mapping with `steps` or a list of steps",
                   {"path": str(path)})
