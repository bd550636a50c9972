"""``python -m fcmae.finetune``: the same as ``finetune/run.py``."""
from .tasks.classify_model import main  # noqa: F401

if __name__ == "__main__":
    main()
