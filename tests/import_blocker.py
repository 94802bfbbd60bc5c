"""Makes the installed `perceptio` package unimportable, for scripts that load exported folders in isolation."""

import sys


class BlockPerceptio:
    """Import hook that refuses `perceptio` and its submodules."""

    def find_spec(self, name, path=None, target=None):
        if name == "perceptio" or name.startswith("perceptio."):
            raise ImportError(f"{name} is blocked: exported folders must not need the perceptio package")
        return None


def block_perceptio() -> None:
    """Install the hook and check that it holds."""
    sys.meta_path.insert(0, BlockPerceptio())
    try:
        import perceptio  # noqa: F401
    except ImportError:
        return
    raise SystemExit("the import hook did not block perceptio")
