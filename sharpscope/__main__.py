"""``python -m sharpscope`` (also ``torchrun ... -m sharpscope train ...``)."""

from .cli import main

if __name__ == "__main__":
    main()
