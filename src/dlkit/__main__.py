"""`python -m dlkit` runs the command line (also under torchrun)."""
from dlkit.cli import main

if __name__ == "__main__":
    main()
