"""``python -m blockquant ...`` is the ``quant`` command (what ``torchrun -m blockquant`` starts)."""
from .frame.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
