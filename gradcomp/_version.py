"""The version of gradcomp, in one place (the package, the hook's agreement check and the build read it)."""

__version__ = "0.1.0"
