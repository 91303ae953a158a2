"""`python -m cxrfair` is the `cxrfair` console script."""

from cxrfair.cli import main

if __name__ == "__main__":
    main()
