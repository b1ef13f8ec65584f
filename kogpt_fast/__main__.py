import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned process (the server's engine) imports the main module again
    sys.exit(main())
