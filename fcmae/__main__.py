"""``python -m fcmae``: the ``fcmae`` command (and ``accelerate launch -m fcmae ...``)."""

from fcmae.cli import main

if __name__ == "__main__":
    main()
