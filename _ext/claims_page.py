"""Sphinx extension: the "Claims, checked" page, rendered from the claims registry and the notebooks.

``claims-registry`` (directive): a summary table (claim, verdict, where it is tested), then one
section per claim of :data:`normlab.runtime.claims.REGISTRY`, with the registered setup, measurement and
criteria, and what the recording notebook measured: each criterion's result and outcome, the
verdict and the evidence sentence (glued from the executed notebook), and what the literature
found at scale. The registry is the one source of the words; the notebooks of the numbers.
"""

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _glue(claim, field):
    return f"{{glue:text}}`{claim.notebook}::claim_{claim.key}_{field}:s`"


def _where(claim):
    chapter = claim.notebook.rsplit("/", 1)[0] + "/index"
    return f"{{ref}}`{claim.section}` ({{doc}}`{chapter}`)"


def registry_markdown():
    """The page's MyST source for every registered claim."""
    from normlab.runtime.claims import REGISTRY

    lines = ["| Claim | Verdict | Tested in |", "|---|---|---|"]
    lines += [f"| {c.text} | {_glue(c, 'verdict')} | {_where(c)} |" for c in REGISTRY.values()]
    for c in REGISTRY.values():
        lines += ["", f"## {c.text}", "",
                  f"- **Verdict**: {_glue(c, 'verdict')}, computed from the criteria below.",
                  f"- **Tested in**: {_where(c)}, `{c.notebook}`.",
                  f"- **Setup**: {c.setup}",
                  f"- **Measured**: {c.measurement}",
                  "- **Criteria, registered before the run**:"]
        lines += [f"  - `{cr.name}`: {cr.says}; outcome: **{_glue(c, cr.name)}**." for cr in c.criteria]
        lines += [f"- **Result** (mean, 95% t interval, sign count over seeds): {_glue(c, 'results')}",
                  f"- **Evidence**: {_glue(c, 'evidence')}"]
        if c.untested:
            lines.append(f"- **Not tested here**: {c.untested}.")
        lines.append(f"- **At scale**: {c.at_scale}")
    return "\n".join(lines)


class ClaimsRegistry(SphinxDirective):
    def run(self):
        import normlab.runtime.claims

        self.env.note_dependency(normlab.runtime.claims.__file__)  # rebuild the page when the registry changes
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(self._lines(), self.content_offset, node, match_titles=True)
        return node.children

    def _lines(self):
        return StringList(registry_markdown().splitlines(), source="normlab.runtime.claims.REGISTRY")


def setup(app):
    app.add_directive("claims-registry", ClaimsRegistry)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
