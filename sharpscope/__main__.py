"""``python -m sharpscope`` (also ``torchrun ... -m sharpscope train ...``)."""

from ._console import main

if __name__ == "__main__":
    main()
