"""The package's longest functions and deepest nestings, and each module's size: a reader's map of where the
code is crowded. Pure `ast`, no imports of the package, so it runs on any checkout:

    python bench/code_shape.py            # the ten longest and the ten deepest
    python bench/code_shape.py --top 25 --modules
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

NESTING = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)


def _depth(node: ast.AST, level: int = 0) -> int:
    """Deepest block nesting inside a function body (a nested def starts its own count)."""
    deepest = level
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        # `elif` is an If inside orelse: it is a sibling branch, not a deeper block
        is_elif = isinstance(node, ast.If) and isinstance(child, ast.If) and child in node.orelse
        step = 1 if isinstance(child, NESTING) and not is_elif else 0
        deepest = max(deepest, _depth(child, level + step))
    return deepest


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the body after the signature and docstring (for a CLI command: its logic, not its options)."""
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return fn.end_lineno - body[0].lineno + 1


def functions(root: Path):
    """(qualified name, lines, nesting depth, body lines) for every function and method under `root`."""
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(root.parent).with_suffix("").as_posix().replace("/", ".")
        stack = [(tree, rel)]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    name = f"{prefix}.{child.name}"
                    lines = child.end_lineno - child.lineno + 1
                    yield name, lines, _depth(child), _body_lines(child)
                    stack.append((child, name))
                elif isinstance(child, ast.ClassDef):
                    stack.append((child, f"{prefix}.{child.name}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "psft_lite"))
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--modules", action="store_true", help="also list every module with its line count")
    args = parser.parse_args()
    root = Path(args.root)
    rows = list(functions(root))
    print(f"{len(rows)} functions in {root.name}/")
    print("\nlongest (lines incl. signature and docstring):")
    for name, lines, _, body in sorted(rows, key=lambda r: (-r[1], r[0]))[: args.top]:
        print(f"  {lines:4d}  {name} (body {body})")
    print("\ndeepest (nested blocks):")
    for name, lines, depth, _ in sorted(rows, key=lambda r: (-r[2], -r[1], r[0]))[: args.top]:
        print(f"  {depth:4d}  {name} ({lines} lines)")
    print(f"\nover 60 lines: {sum(r[1] > 60 for r in rows)}; nested deeper than 4: {sum(r[2] > 4 for r in rows)}")
    cli = [r for r in rows if r[0].startswith(f"{root.name}.cli.")]
    if cli:
        body, name = max((r[3], r[0]) for r in cli)
        print(f"CLI: longest body {body} lines ({name}), mean {sum(r[3] for r in cli) / len(cli):.0f}")
    if args.modules:
        print("\nmodules:")
        for path in sorted(root.rglob("*.py")):
            print(f"  {len(path.read_text().splitlines()):5d}  {path.relative_to(root.parent).as_posix()}")


if __name__ == "__main__":
    main()
