"""Optional dependencies: one check, one message. A feature that needs a package psft-lite does not install by
default asks `require_extra` first, so a missing package is one paragraph naming the pip line, said before any
model loads or any training starts, never an ImportError traceback afterwards."""

from __future__ import annotations

import importlib.util

from psft_lite.core.errors import RecipeError

# import name -> (psft-lite extra that installs it, what a user would pip install without the extra); a caller may
# name the extra itself instead (a tracker backend carries its own)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("plot", "matplotlib"),
    "lm_eval": ("harness", "lm-eval"),
    "llama_cpp": ("gguf", "llama-cpp-python"),
    "trl": ("bench", "trl"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or half-installed
        return False


def install_hint(modules: list[str], extra: str | None = None) -> str:
    """`pip install 'psft-lite[a,b]'` for the extras that bring `modules`."""
    extras = extra or ",".join(dict.fromkeys(EXTRAS[m][0] for m in modules))
    return f"pip install 'psft-lite[{extras}]'"


def require_extra(
    modules: str | list[str],
    what: str,
    otherwise: str = "",
    error: type[Exception] = RecipeError,
    extra: str | None = None,
) -> None:
    """Raise `error` with one paragraph when any of `modules` is missing: "`what`: <package> is not installed.
    Install it with: pip install 'psft-lite[extra]' (or pip install <package>`otherwise`)."."""
    names = [modules] if isinstance(modules, str) else list(modules)
    missing = [m for m in names if not installed(m)]
    if not missing:
        return
    pkgs = [EXTRAS[m][1] if m in EXTRAS else m for m in missing]
    one = len(missing) == 1
    raise error(
        f"{what}: {', '.join(pkgs)} {'is' if one else 'are'} not installed. Install {'it' if one else 'them'} with: "
        f"{install_hint(missing, extra)} (or pip install {' '.join(pkgs)}{otherwise})."
    )
