"""``python finetune/run.py ...`` (and ``accelerate launch finetune/run.py``): the same as
``fcmae finetune ...``; see ``fcmae finetune --help``."""

from fcmae.tasks.classify import main

if __name__ == "__main__":
    main(prog="finetune/run.py")
