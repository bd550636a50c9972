"""``python finetune/segment.py ...``: the same as ``fcmae segment ...``; ``finetune/segment.py predict IMAGES
--checkpoint RUN`` is ``fcmae predict``."""

import sys

from fcmae.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    main(args if args[:1] == ["predict"] else ["segment", *args])
