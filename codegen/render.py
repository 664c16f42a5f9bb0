"""One Jinja environment for every template (StrictUndefined: a missing variable is an error)."""
from __future__ import annotations

import functools
from importlib import resources

import jinja2


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    root = resources.files("layerforge.templates")
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: root.joinpath(name).read_text(encoding="utf-8")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(template: str, **variables) -> str:
    return environment().get_template(template).render(**variables)


@functools.lru_cache(maxsize=None)
def read_template(name: str) -> str:
    return resources.files("layerforge.templates").joinpath(name).read_text(encoding="utf-8")
