"""``python -m fcmae.hub export|push``: see ``fcmae.weights.hub``."""
from .weights.hub import export, export_and_push, main, parse_formats, push  # noqa: F401
from .weights.formats import load_fcmae_weights  # noqa: F401

if __name__ == "__main__":
    main()
