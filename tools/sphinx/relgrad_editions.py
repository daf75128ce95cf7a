"""Sphinx extension for the PDF and the student edition (tools/editions.py):

``hide_solutions`` also removes *gated* solutions (``solution-start`` ... ``solution-end``).
sphinx-exercise 1.2.1 implements ``hide_solutions = True`` for the ``solution`` directive only: a gated
``solution-start`` then produces no node, but everything between it and ``solution-end`` (the solution's
prose and code cells) stays in the page, and the ``solution-end`` node is left over, which the LaTeX writer
cannot render ("unknown node type: solution_end_node"). The book's solutions are all gated, because they
contain code cells. Here ``solution-start`` is a subclass that, when solutions are hidden, leaves a marker;
a transform then removes the marker, every sibling after it up to the next ``solution-end`` node, and that
node. With ``hide_solutions = False`` (the website) nothing changes.

Loaded for every build from _config.yml (``sphinx.local_extensions``), so the editions' configurations differ
from the website's only by ``hide_solutions``.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.transforms import SphinxTransform
from sphinx_exercise.directive import SolutionStartDirective
from sphinx_exercise.nodes import solution_end_node


class hidden_solution_start(nodes.Element):
    """Where a gated solution began; removed with the solution by :class:`RemoveHiddenSolutions`."""


class HidableSolutionStart(SolutionStartDirective):
    def run(self):
        out = super().run()             # records the gated registry's start, as sphinx-exercise checks it
        if self.env.app.config.hide_solutions:
            return [hidden_solution_start()]
        return out


class RemoveHiddenSolutions(SphinxTransform):
    # before sphinx-exercise's MergeGatedSolutions (priority 10), which would otherwise see a lone end node
    default_priority = 5

    def apply(self) -> None:
        for marker in list(self.document.findall(hidden_solution_start)):
            parent = marker.parent
            start = parent.index(marker)
            end = next((i for i in range(start, len(parent.children))
                        if isinstance(parent.children[i], solution_end_node)), None)
            if end is None:
                raise RuntimeError(f"{self.env.docname}: a solution-start without a solution-end after it at the "
                                   "same level (relgrad_editions)")
            del parent.children[start:end + 1]


def setup(app: Sphinx) -> dict:
    app.setup_extension("sphinx_exercise")
    app.add_node(hidden_solution_start)
    app.add_directive("solution-start", HidableSolutionStart, override=True)
    app.add_transform(RemoveHiddenSolutions)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
