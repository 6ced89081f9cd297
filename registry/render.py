"""Rich renderings of registry records, shared by the CLI (``weightlab lineage``) and the demo."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.tree import Tree

    from weightlab.registry.schemas import LineageNode


def lineage_tree(node: LineageNode) -> Tree:
    """A rich Tree of a :class:`~weightlab.registry.schemas.LineageNode`: each input with its role, scale and the
    pipeline components it changed (where recorded); unregistered inputs by hash."""
    from rich.markup import escape
    from rich.tree import Tree

    def label(n, role=None, scale=None, components=None) -> str:
        head = f"[cyan]{escape(role)}[/] " if role else ""
        head += f"x{scale:g} " if scale is not None else ""
        tail = f" [green]components: {escape(', '.join(components) or 'none')}[/]" if components is not None else ""
        if n.version is None:
            return head + f"{escape(n.label)} [dim](not registered, tensor hash {n.tensor_hash[:12]})[/]" + tail
        v = n.version
        return head + f"[bold]{v.ref}[/] [dim]({v.kind}, {v.representation}, {v.tensor_hash[:12]})[/]" + tail

    def grow(tree, n) -> None:
        if n.truncated:
            tree.add("[dim]...[/]")
            return
        if n.relation:
            how = ", ".join(str(n.recipe[k]) for k in ("method", "dtype") if k in n.recipe) if n.recipe else ""
            branch = tree.add(f"[magenta]{n.relation}[/]" + (f" [dim]({escape(how)})[/]" if how else ""))
            for e in n.inputs:
                grow(branch.add(label(e.node, e.role, e.scale, e.components)), e.node)

    root = Tree(label(node))
    grow(root, node)
    return root
