"""``python -m fcmae.finetune``: the same as ``finetune/run.py``."""
from .tasks.classify import main

if __name__ == "__main__":
    main()
