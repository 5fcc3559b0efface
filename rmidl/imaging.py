"""PLACEHOLDER (library helper replaces this)."""


def load_image(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError


def save_image(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NotImplementedError
