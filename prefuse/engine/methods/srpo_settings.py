"""SRPO's section of `prefuse train`'s settings: the revision prompt (engine/methods/srpo.py reads it)."""
from __future__ import annotations

from dataclasses import dataclass

from prefuse.engine.checks import setting
from prefuse.engine.methods.srpo import load_template


@dataclass
class RevisionSettings:
    revision_template: str | None = setting(None, "srpo: the revision prompt, a file or a string with {prompt} and "
                                                  "{previous} (docs/methods/srpo.md)")

    def check(self) -> None:
        """A template that does not load: ValueError `revision_template: ...` (engine/methods/srpo.py)."""
        if self.revision_template is not None:

            load_template(self.revision_template)
