"""PLACEHOLDER (library helper replaces this)."""


def activate(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError
