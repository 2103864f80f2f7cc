"""Only what pyproject.toml cannot say: install `lazymerge-lm_eval.pth` at the top of site-packages (see
lazymerge/lm_eval_plugin.py: it lets lm-eval 0.4.13, which does not read entry points, find `--model lazymerge`)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lazymerge-lm_eval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join("lazymerge", PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
