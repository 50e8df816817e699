"""The configs shipped with pgot, installed as the package ``pgot.configs`` (see ``pyproject.toml``).

Read them by name: ``pgot-train --config debug``, ``pgot config list``, ``pgot config copy debug my.yaml``,
or :func:`pgot.config.find_config` / :func:`pgot.config.load_config` (``load_config("debug")``).
"""
