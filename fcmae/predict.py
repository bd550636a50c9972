"""``python -m fcmae.predict``: see ``fcmae.tasks.predict``."""
from .tasks.predict import main

if __name__ == "__main__":
    main()
