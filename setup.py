"""The configs as data files of `pip install .` (pyproject.toml has the rest): <prefix>/share/weighted-mtp/configs
and one folder per configs/<name>/, found on disk, so that a new pipeline's configs ship with no edit here.
(pyproject's static data-files would need a line per folder: setuptools flattens a glob into one target.)"""
from pathlib import Path

from setuptools import setup

folders = [Path("configs"), *sorted(p for p in Path("configs").iterdir() if p.is_dir())]
setup(data_files=[(f"share/weighted-mtp/{folder}", [str(f) for f in sorted(folder.glob("*.yaml"))])
                  for folder in folders])
